//! The control plane as seen from the agent: its servers' addresses (port
//! 15012; several, comma-separated, or a name that resolves to several), the
//! name their serving certificates must carry (`istiod.istio-system.svc`)
//! and the mesh root they must chain to. Every connection is mutual TLS
//! when the agent has a workload certificate, and server-authenticated TLS
//! with a bearer token before it has one.
//!
//! Each connection tries the server that answered last first, then the
//! others in turn, each for a few seconds at most: when a server dies, the
//! next connection (a reconnecting xDS stream, a renewal) goes to another.
//!
//! This module owns making gRPC channels; what is sent over them belongs to
//! [`crate::identity`] (the CA) and [`crate::xds_proxy`] (ADS).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::identity::Credentials;

/// Why no channel to the control plane could be opened.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] vmesh_ca::TlsError),
    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connecting to {address}: no answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
}

/// Where the control plane is and how to recognise it.
#[derive(Clone)]
pub struct Upstream {
    /// As configured: `host:port`, comma-separated for several servers.
    address: Arc<str>,
    /// Which of the resolved servers answered last: tried first next time.
    preferred: Arc<parking_lot::Mutex<Option<std::net::SocketAddr>>>,
    server_name: ServerName<'static>,
    root_pem: Arc<str>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("address", &self.address)
            .field("server_name", &self.server_name)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// `address` is `host:port` (a host name is resolved at each
    /// connection); `root_pem` is the mesh root (`root-cert.pem`). The
    /// server must present a certificate for
    /// [`vmesh_ca::ISTIOD_SERVICE_NAME`] unless
    /// [`Upstream::with_server_name`] says otherwise.
    pub fn new(address: impl Into<String>, root_pem: impl Into<String>) -> Upstream {
        Upstream {
            address: address.into().into(),
            preferred: Arc::default(),
            server_name: ServerName::try_from(vmesh_ca::ISTIOD_SERVICE_NAME)
                .expect("a valid DNS name"),
            root_pem: root_pem.into().into(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// The name the server's certificate must carry.
    pub fn with_server_name(mut self, name: &str) -> Result<Upstream, UpstreamError> {
        self.server_name = ServerName::try_from(name.to_owned())
            .map_err(|_| UpstreamError::ServerName(name.to_owned()))?;
        Ok(self)
    }

    /// How long TCP, TLS and HTTP/2 set-up may take (10 s by default).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Upstream {
        self.connect_timeout = timeout;
        self
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// A connected channel, presenting `client` as TLS client certificate
    /// when given. `keepalive` turns on HTTP/2 pings for long-lived streams,
    /// so a silently dead path is noticed.
    pub(crate) async fn channel(
        &self,
        client: Option<&Credentials>,
        keepalive: bool,
    ) -> Result<Channel, UpstreamError> {
        let config = Arc::new(vmesh_ca::client_tls_config(
            &self.root_pem,
            client.map(|c| (c.chain(), c.key_pem())),
        )?);
        let authority = match &self.server_name {
            ServerName::DnsName(name) => name.as_ref().to_owned(),
            other => other.to_str().into_owned(),
        };
        let uri = format!("http://{authority}");
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|_| UpstreamError::ServerName(authority.clone()))?
            .tcp_nodelay(true);
        if keepalive {
            endpoint = endpoint
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true);
        }
        let address = self.address.clone();
        let preferred = self.preferred.clone();
        let server_name = self.server_name.clone();
        let attempt_timeout = self.connect_timeout.min(SERVER_ATTEMPT);
        let connector = tower::service_fn(move |_: Uri| {
            let (config, address, server_name, preferred) = (
                config.clone(),
                address.clone(),
                server_name.clone(),
                preferred.clone(),
            );
            async move {
                let last = *preferred.lock();
                let servers = resolve(&address, last).await?;
                let mut last_error = None;
                for server in servers {
                    let connect = async {
                        let tcp = TcpStream::connect(server).await?;
                        tcp.set_nodelay(true)?;
                        TlsConnector::from(config.clone())
                            .connect(server_name.clone(), tcp)
                            .await
                    };
                    match tokio::time::timeout(attempt_timeout, connect).await {
                        Ok(Ok(tls)) => {
                            *preferred.lock() = Some(server);
                            return Ok::<_, std::io::Error>(TokioIo::new(tls));
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%server, "control-plane server did not answer: {e}");
                            last_error = Some(e);
                        }
                        Err(_) => {
                            tracing::debug!(%server, "control-plane server did not answer within {attempt_timeout:?}");
                            last_error = Some(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("{server} did not answer within {attempt_timeout:?}"),
                            ));
                        }
                    }
                }
                Err(last_error.unwrap_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no server address")
                }))
            }
        });
        // Every server may be tried in turn.
        let servers = self.address.split(',').count().max(1) as u32;
        match tokio::time::timeout(
            self.connect_timeout.max(attempt_timeout * servers),
            endpoint.connect_with_connector(connector),
        )
        .await
        {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(source)) => Err(UpstreamError::Connect {
                address: self.address.to_string(),
                source,
            }),
            Err(_) => Err(UpstreamError::Timeout {
                address: self.address.to_string(),
                timeout: self.connect_timeout,
            }),
        }
    }
}

/// How long one server of several gets to answer (TCP and TLS) before the
/// next is tried.
const SERVER_ATTEMPT: Duration = Duration::from_secs(3);

/// Every address of every `host:port` in `configured` (comma-separated),
/// in order, with `preferred` (the one that answered last) first.
async fn resolve(
    configured: &str,
    preferred: Option<std::net::SocketAddr>,
) -> std::io::Result<Vec<std::net::SocketAddr>> {
    let mut servers = Vec::new();
    let mut failure = None;
    for entry in configured
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        match tokio::net::lookup_host(entry).await {
            Ok(found) => {
                for address in found {
                    if !servers.contains(&address) {
                        servers.push(address);
                    }
                }
            }
            Err(e) => failure = Some(e),
        }
    }
    if servers.is_empty() {
        return Err(failure.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no server address")
        }));
    }
    if let Some(first) = preferred.and_then(|p| servers.iter().position(|s| *s == p)) {
        servers.rotate_left(first);
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn several_servers_resolve_in_order_with_the_last_that_answered_first() {
        let servers = resolve("127.0.0.1:1, 127.0.0.2:2,127.0.0.1:1", None)
            .await
            .unwrap();
        let text: Vec<String> = servers.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["127.0.0.1:1", "127.0.0.2:2"]);
        let rotated = resolve("127.0.0.1:1,127.0.0.2:2,127.0.0.3:3", Some(servers[1]))
            .await
            .unwrap();
        let text: Vec<String> = rotated.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["127.0.0.2:2", "127.0.0.3:3", "127.0.0.1:1"]);
        assert!(resolve(" , ", None).await.is_err());
    }
}
