//! The CA's figures under Istio's (Citadel's) names, so that Istio's
//! dashboards read them: certificate requests received, refused before
//! signing, refused by the signer, and certificates issued.
//!
//! This module owns the definitions and their registration; the
//! [`crate::CertificateService`] records into them.

use prometheus::{IntCounter, Registry};

#[derive(Debug, Clone)]
pub struct CaMetrics {
    /// `citadel_server_csr_count`: certificate requests received.
    pub csrs: IntCounter,
    /// `citadel_server_authentication_failure_count`: callers refused.
    pub authentication_failures: IntCounter,
    /// `citadel_server_csr_sign_err_count`: requests the signer refused.
    pub sign_errors: IntCounter,
    /// `citadel_server_success_cert_issuance_count`: certificates issued.
    pub issued: IntCounter,
}

impl CaMetrics {
    /// The metrics, registered in `registry`.
    pub fn register(registry: &Registry) -> Result<CaMetrics, prometheus::Error> {
        let metrics = CaMetrics {
            csrs: IntCounter::new(
                "citadel_server_csr_count",
                "The number of CSRs received by Citadel server.",
            )?,
            authentication_failures: IntCounter::new(
                "citadel_server_authentication_failure_count",
                "The number of authentication failures.",
            )?,
            sign_errors: IntCounter::new(
                "citadel_server_csr_sign_err_count",
                "The number of errors occurred when signing the CSR.",
            )?,
            issued: IntCounter::new(
                "citadel_server_success_cert_issuance_count",
                "The number of certificates issuances that have succeeded.",
            )?,
        };
        for counter in [
            &metrics.csrs,
            &metrics.authentication_failures,
            &metrics.sign_errors,
            &metrics.issued,
        ] {
            registry.register(Box::new(counter.clone()))?;
        }
        Ok(metrics)
    }
}
