//! The control plane as seen from the agent: an address (port 15012),
//! the name its serving certificate must carry (`istiod.istio-system.svc`)
//! and the mesh root it must chain to. Every connection is mutual TLS when
//! the agent has a workload certificate, and server-authenticated TLS with
//! a bearer token before it has one.
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
    address: Arc<str>,
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
        let server_name = self.server_name.clone();
        let connector = tower::service_fn(move |_: Uri| {
            let (config, address, server_name) =
                (config.clone(), address.clone(), server_name.clone());
            async move {
                let tcp = TcpStream::connect(&*address).await?;
                tcp.set_nodelay(true)?;
                let tls = TlsConnector::from(config).connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        match tokio::time::timeout(
            self.connect_timeout,
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
