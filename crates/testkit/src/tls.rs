//! gRPC over the mesh's TLS, as tests need it on both ends (feature
//! `testing`): a client channel to the CA/xDS port that trusts only the
//! mesh root and presents a workload certificate when given one, and the
//! accept loop that hands tonic a stream of TLS connections.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A gRPC channel to the TLS port at `addr` (the server's certificate
/// names `istiod.istio-system.svc`), trusting only `root_pem` and
/// presenting `identity` (certificate chain, key) when given. Panics on a
/// root or identity that is not PEM.
pub async fn connect(
    addr: SocketAddr,
    root_pem: &str,
    identity: Option<(&[String], &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let config = Arc::new(
        vmesh_ca::client_tls_config(root_pem, identity).expect("a client TLS configuration"),
    );
    Endpoint::from_static("http://istiod.istio-system.svc:15012")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let config = config.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = ServerName::try_from(vmesh_ca::ISTIOD_SERVICE_NAME)
                    .expect("the istiod service name is a DNS name");
                let tls = TlsConnector::from(config).connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}

/// The TLS connections `listener` accepts through `tls`, as tonic's
/// `serve_with_incoming` takes them, and the task accepting them (abort it
/// to stop). A failed handshake (a client certificate from another CA, for
/// one) just drops that connection.
pub fn incoming(
    listener: TcpListener,
    tls: TlsAcceptor,
) -> (
    ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>,
    JoinHandle<()>,
) {
    let (conns, incoming) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (tls, conns) = (tls.clone(), conns.clone());
            tokio::spawn(async move {
                if let Ok(stream) = tls.accept(tcp).await {
                    let _ = conns.send(Ok(stream)).await;
                }
            });
        }
    });
    (ReceiverStream::new(incoming), acceptor)
}
