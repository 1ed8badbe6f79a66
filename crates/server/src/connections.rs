//! Connection hygiene for the server's listeners: how many connections one
//! source and all sources together may hold ([`Gate`]), and how long a
//! connection may stay silent ([`Silence`]) before it is closed, so that
//! clients which connect and then say nothing cannot use up the process's
//! file descriptors and starve everyone else. It also raises the process's
//! own file descriptor limit at start ([`raise_fd_limit`]).
//!
//! What a listener speaks (TLS, HTTP/1, HTTP/2) and its own timeouts (TLS
//! handshake, HTTP header reads, HTTP/2 keepalive) belong to its server;
//! this module only counts and times out connections.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How many connections a listener admits, and how long they may be silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once, from everyone.
    pub total: usize,
    /// Connections open at once from one source address. Generous: a
    /// gateway or NAT puts many VMs behind one address.
    pub per_source: usize,
    /// A connection that sends nothing for this long is closed. Live
    /// clients always send within it: HTTP/2 peers answer the server's
    /// keepalive pings ([`keepalive_interval`]), HTTP/1 clients send a request.
    pub idle: Duration,
}

/// How often the server pings its HTTP/2 peers, and how long it waits for
/// the answer: a third of the idle limit, so that a live peer always has
/// sent something (the answer) before its connection would count as silent.
pub fn keepalive_interval(limits: ConnectionLimits) -> Duration {
    limits.idle / 3
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            total: 50_000,
            per_source: 4_096,
            idle: Duration::from_secs(60),
        }
    }
}

impl ConnectionLimits {
    /// These limits with `total` lowered to what `fd_limit` descriptors
    /// allow, keeping room for the store, files and outbound connections.
    pub fn within_fd_limit(self, fd_limit: u64) -> ConnectionLimits {
        const RESERVED: u64 = 256;
        let room = usize::try_from(fd_limit.saturating_sub(RESERVED).max(64)).unwrap_or(usize::MAX);
        ConnectionLimits {
            total: self.total.min(room),
            ..self
        }
    }
}

/// Counts a listener's open connections, by source and in total.
#[derive(Debug)]
pub struct Gate {
    limits: ConnectionLimits,
    open: Mutex<GateState>,
    what: &'static str,
}

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
    /// When a refusal was last logged: refusals come in floods.
    last_logged: Option<Instant>,
}

impl Gate {
    /// A gate for the listener called `what` in logs.
    pub fn new(limits: ConnectionLimits, what: &'static str) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            open: Mutex::new(GateState::default()),
            what,
        })
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// The listener's name in logs.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Admits a connection from `source`, or refuses it (`None`) when the
    /// source or the listener is full. The pass frees its place when dropped.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Pass> {
        let mut open = self.open.lock();
        let from_source = open.by_source.get(&source).copied().unwrap_or(0);
        let refusal = if open.total >= self.limits.total {
            Some(format!("{} connections open", open.total))
        } else if from_source >= self.limits.per_source {
            Some(format!("{from_source} connections open from {source}"))
        } else {
            None
        };
        if let Some(why) = refusal {
            let now = Instant::now();
            if open
                .last_logged
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
            {
                open.last_logged = Some(now);
                tracing::warn!(
                    "{}: refusing connections ({why}; limits {} in all, {} per source)",
                    self.what,
                    self.limits.total,
                    self.limits.per_source
                );
            }
            return None;
        }
        open.total += 1;
        *open.by_source.entry(source).or_default() += 1;
        Some(Pass {
            gate: self.clone(),
            source,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().total
    }
}

/// A connection's place in its [`Gate`].
#[derive(Debug)]
pub struct Pass {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock();
        open.total -= 1;
        if let Some(count) = open.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

/// A connection that fails with `TimedOut` once its peer has sent nothing
/// for the idle limit (except while it has a request in flight, when
/// silence is the server's: a long watch), and holds its [`Pass`] while open.
#[derive(Debug)]
pub struct Silence<S> {
    inner: S,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    in_flight: Option<InFlight>,
    _pass: Pass,
}

impl<S> Silence<S> {
    pub fn new(inner: S, idle: Duration, pass: Pass) -> Silence<S> {
        Silence {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            in_flight: None,
            _pass: pass,
        }
    }

    /// Silent for as long as it likes while `in_flight` counts a request.
    pub fn with_in_flight(self, in_flight: InFlight) -> Silence<S> {
        Silence {
            in_flight: Some(in_flight),
            ..self
        }
    }
}

/// How many requests of one HTTP connection are being answered: a request
/// counts from its arrival until its response body is done or dropped.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn busy(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }

    fn begin(&self) -> Answering {
        self.0.fetch_add(1, Ordering::Relaxed);
        Answering(self.0.clone())
    }

    /// `router` with each request counted here.
    pub fn counting(&self, router: axum::Router) -> axum::Router {
        let in_flight = self.clone();
        router.layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let answering = in_flight.begin();
                async move {
                    next.run(request).await.map(|body| {
                        axum::body::Body::new(CountedBody {
                            inner: body,
                            _answering: answering,
                        })
                    })
                }
            },
        ))
    }
}

/// One request in flight, until dropped.
#[derive(Debug)]
struct Answering(Arc<AtomicUsize>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight until it is dropped.
struct CountedBody {
    inner: axum::body::Body,
    _answering: Answering,
}

impl http_body::Body for CountedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Silence<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(result)
            }
            Poll::Pending if self.in_flight.as_ref().is_some_and(InFlight::busy) => {
                let next = Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Pending
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer sent nothing for {:?}", self.idle),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Silence<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Silence<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The next connection of `listener` that `gate` admits, or `None` once
/// shutdown is asked. Accept errors (out of descriptors, most likely) are
/// waited out, never spun on.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    gate: &Arc<Gate>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr, Pass)> {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("{}: accepting: {e}", gate.what());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            // The guard `wait_for` returns is not Send: drop it inside.
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return None,
        };
        if let Some(pass) = gate.admit(peer.ip()) {
            return Some((tcp, peer, pass));
        }
    }
}

/// The connections of `listener` for a gRPC server, until `shutdown`: each
/// admitted by `gate`, made ready by `upgrade` on a task of its own (a TLS
/// handshake, say, under its own timeout; `None` drops the connection), so
/// that a slow client holds up no one else, then watched for [`Silence`].
pub fn incoming<S, F, Fut>(
    listener: tokio::net::TcpListener,
    gate: Arc<Gate>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    upgrade: F,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Silence<S>>>
where
    S: Send + 'static,
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = Option<S>> + Send + 'static,
{
    let (ready, connections) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let idle = gate.limits().idle;
        while let Some((tcp, peer, pass)) = accept(&listener, &gate, &mut shutdown).await {
            let upgraded = upgrade(tcp, peer);
            let ready = ready.clone();
            tokio::spawn(async move {
                if let Some(connection) = upgraded.await {
                    let _ = ready.send(Ok(Silence::new(connection, idle, pass))).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(connections)
}

/// Raises the limit on open files as far as the OS allows: both limits to
/// the kernel's ceiling (`fs.nr_open`) when the process may (root), else
/// the soft limit to the hard one. Returns the soft limit after.
pub fn raise_fd_limit() -> u64 {
    use rlimit::Resource;
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        // Some kernels allow a billion; a million is room enough.
        .map(|ceiling| ceiling.min(1 << 20));
    if let Some(ceiling) = ceiling
        && let Ok((soft, hard)) = rlimit::getrlimit(Resource::NOFILE)
        && hard < ceiling
        && rlimit::setrlimit(Resource::NOFILE, ceiling, ceiling).is_ok()
    {
        tracing::debug!("open-file limit raised from {soft}/{hard} to {ceiling}");
        return ceiling;
    }
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit: {e}");
            rlimit::getrlimit(Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_gate_counts_by_source_and_in_all() {
        let gate = Gate::new(
            ConnectionLimits {
                total: 3,
                per_source: 2,
                idle: Duration::from_secs(1),
            },
            "test",
        );
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = gate.admit(a).unwrap();
        let _second = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none(), "a third from one source");
        let _third = gate.admit(b).unwrap();
        assert!(gate.admit(b).is_none(), "a fourth in all");
        drop(first);
        let _fourth = gate.admit(b).expect("a place freed");
        assert_eq!(gate.open(), 3);
    }

    #[test]
    fn the_fd_limit_bounds_the_total() {
        let limits = ConnectionLimits::default();
        assert_eq!(limits.within_fd_limit(1024).total, 768);
        assert_eq!(limits.within_fd_limit(1 << 20).total, limits.total);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_times_out_and_traffic_keeps_it_open() {
        let gate = Gate::new(ConnectionLimits::default(), "test");
        let (client, server) = tokio::io::duplex(64);
        let mut server = Silence::new(
            server,
            Duration::from_secs(5),
            gate.admit("10.0.0.1".parse().unwrap()).unwrap(),
        );
        let mut client = client;
        let mut byte = [0u8; 1];
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            client.write_all(b"x").await.unwrap();
            server.read_exact(&mut byte).await.unwrap();
        }
        let error = server.read(&mut byte).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        drop(server);
        assert_eq!(gate.open(), 0, "the pass goes with the connection");
    }
}
