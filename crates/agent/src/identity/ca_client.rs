//! The real [`CertificateSigner`]: Istio's
//! `IstioCertificateService/CreateCertificate` on the control plane's port
//! 15012, one TLS connection per call (renewals are hours apart).

use std::time::Duration;

use tonic::Request;
use tonic::metadata::MetadataValue;
use vmesh_ca::{IstioCertificateRequest, IstioCertificateServiceClient};

use super::{CaAuth, CertificateSigner, SignError};
use crate::upstream::Upstream;

/// Asks the mesh CA for certificates.
#[derive(Debug, Clone)]
pub struct CaClient {
    upstream: Upstream,
    cluster_id: Option<String>,
    timeout: Duration,
}

impl CaClient {
    pub fn new(upstream: Upstream) -> CaClient {
        CaClient {
            upstream,
            cluster_id: None,
            timeout: Duration::from_secs(30),
        }
    }

    /// Sent as the `clusterid` call metadata (`ISTIO_META_CLUSTER_ID`).
    pub fn with_cluster_id(mut self, cluster_id: impl Into<String>) -> CaClient {
        self.cluster_id = Some(cluster_id.into());
        self
    }

    /// How long one call may take, connection included (30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> CaClient {
        self.timeout = timeout;
        self
    }
}

#[tonic::async_trait]
impl CertificateSigner for CaClient {
    async fn sign(
        &self,
        csr_pem: &str,
        validity: Option<Duration>,
        auth: CaAuth<'_>,
    ) -> Result<Vec<String>, SignError> {
        let mut request = Request::new(IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: validity
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            metadata: None,
        });
        let client_cert = match auth {
            CaAuth::Token(token) => {
                let value = MetadataValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| SignError::BadToken)?;
                request.metadata_mut().insert("authorization", value);
                None
            }
            CaAuth::Certificate(creds) => Some(creds),
        };
        if let Some(cluster_id) = &self.cluster_id
            && let Ok(value) = MetadataValue::try_from(cluster_id.as_str())
        {
            request.metadata_mut().insert("clusterid", value);
        }
        let call = async {
            let channel = self.upstream.channel(client_cert, false).await?;
            let response = IstioCertificateServiceClient::new(channel)
                .create_certificate(request)
                .await
                .map_err(|status| SignError::Refused {
                    code: status.code(),
                    message: status.message().to_owned(),
                })?;
            Ok::<_, SignError>(response.into_inner().cert_chain)
        };
        let chain = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| SignError::Timeout(self.timeout))??;
        if chain.is_empty() {
            return Err(SignError::EmptyChain);
        }
        Ok(chain)
    }
}
