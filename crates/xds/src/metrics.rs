//! The xDS server's figures under Istio's names, so that Istio's
//! control-plane dashboard reads them: connected proxies (`pilot_xds`),
//! pushes and refusals by type, how long pushes, sends and convergence take.
//!
//! This module owns the metric definitions and their registration; the ADS
//! server records into them, and the server's monitoring port encodes the
//! registry.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// Istio's buckets for push and convergence times, in seconds.
const TIME_BUCKETS: [f64; 8] = [0.01, 0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 30.0];
/// Istio's buckets for the size of one response, in bytes.
const SIZE_BUCKETS: [f64; 6] = [
    1.0,
    10_000.0,
    1_000_000.0,
    4_000_000.0,
    10_000_000.0,
    40_000_000.0,
];

#[derive(Debug, Clone)]
pub struct XdsMetrics {
    /// `pilot_xds`: proxies connected to this server.
    pub connected: IntGauge,
    /// `pilot_xds_pushes{type}`: responses sent, by type (`cds`, `eds`, …).
    pub pushes: IntCounterVec,
    /// `pilot_total_xds_rejects{type}`: responses the proxies refused.
    pub rejects: IntCounterVec,
    /// `pilot_proxy_convergence_time`: from the first configuration change
    /// of a push to the last response of that push written to a proxy.
    pub convergence: Histogram,
    /// `pilot_xds_push_time{type}`: from the start of a proxy's push to one
    /// response of it written.
    pub push_time: HistogramVec,
    /// `pilot_xds_send_time`: writing one response to the proxy's stream.
    pub send_time: Histogram,
    /// `pilot_xds_config_size_bytes{type}`: the encoded size of a response.
    pub config_size: HistogramVec,
}

impl XdsMetrics {
    /// The metrics, registered in `registry`.
    pub fn register(registry: &Registry) -> Result<XdsMetrics, prometheus::Error> {
        let metrics = XdsMetrics {
            connected: IntGauge::new(
                "pilot_xds",
                "Number of endpoints connected to this pilot using XDS.",
            )?,
            pushes: IntCounterVec::new(
                Opts::new(
                    "pilot_xds_pushes",
                    "Pilot build and send errors for lds, rds, cds and eds.",
                ),
                &["type"],
            )?,
            rejects: IntCounterVec::new(
                Opts::new(
                    "pilot_total_xds_rejects",
                    "Total number of XDS responses from pilot rejected by proxy.",
                ),
                &["type"],
            )?,
            convergence: Histogram::with_opts(
                HistogramOpts::new(
                    "pilot_proxy_convergence_time",
                    "Delay in seconds between config change and a proxy receiving all required configuration.",
                )
                .buckets(TIME_BUCKETS.to_vec()),
            )?,
            push_time: HistogramVec::new(
                HistogramOpts::new(
                    "pilot_xds_push_time",
                    "Total time in seconds Pilot takes to push lds, rds, cds and eds.",
                )
                .buckets(TIME_BUCKETS.to_vec()),
                &["type"],
            )?,
            send_time: Histogram::with_opts(
                HistogramOpts::new(
                    "pilot_xds_send_time",
                    "Total time in seconds Pilot takes to send generated configuration.",
                )
                .buckets(TIME_BUCKETS.to_vec()),
            )?,
            config_size: HistogramVec::new(
                HistogramOpts::new(
                    "pilot_xds_config_size_bytes",
                    "Distribution of configuration sizes pushed to clients",
                )
                .buckets(SIZE_BUCKETS.to_vec()),
                &["type"],
            )?,
        };
        registry.register(Box::new(metrics.connected.clone()))?;
        registry.register(Box::new(metrics.pushes.clone()))?;
        registry.register(Box::new(metrics.rejects.clone()))?;
        registry.register(Box::new(metrics.convergence.clone()))?;
        registry.register(Box::new(metrics.push_time.clone()))?;
        registry.register(Box::new(metrics.send_time.clone()))?;
        registry.register(Box::new(metrics.config_size.clone()))?;
        Ok(metrics)
    }

    /// Metrics registered nowhere: for an ADS server nobody scrapes.
    pub fn unregistered() -> XdsMetrics {
        XdsMetrics::register(&Registry::new()).expect("the metric definitions are valid")
    }
}

/// Istio's short name of a type URL in metric labels.
pub fn type_label(type_url: &str) -> &'static str {
    match type_url {
        crate::ads::CLUSTER_TYPE => "cds",
        crate::ads::ENDPOINT_TYPE => "eds",
        crate::ads::LISTENER_TYPE => "lds",
        crate::ads::ROUTE_TYPE => "rds",
        crate::ads::NAME_TABLE_TYPE => "nds",
        _ => "other",
    }
}
