//! The vmesh node agent — what Istio's pilot-agent does
//! beside Envoy on a VM: it gets and renews the workload's certificate,
//! serves it to Envoy over SDS, relays Envoy's xDS to the control plane
//! over mutual TLS, writes Envoy's bootstrap and runs Envoy.
//!
//! This crate owns:
//! - [`identity`]: the workload key and certificate — first from the CA
//!   with the bootstrap token, then renewed at half life with the current
//!   certificate; kept on disk (key 0600) and published on a `watch`
//!   channel;
//! - [`sds`]: Envoy's SDS on a Unix socket (secrets `default`, `ROOTCA`);
//! - [`xds_proxy`]: Envoy's ADS on a Unix socket, relayed to port 15012;
//! - [`bootstrap`]: Envoy's bootstrap JSON, Istio-style;
//! - [`upstream`]: TLS channels to the control plane;
//! - [`agent`]: all of the above run together ([`agent::start`]);
//! - [`envoy`]: the Envoy process — found, made runnable by the proxy user,
//!   started again with [`backoff`] when it dies, drained and stopped;
//! - [`child`]: processes bound to the agent's life (the kernel kills them
//!   when it dies) and found again by pid file after a crash;
//! - [`capture`]: traffic capture with iptables, Istio's rules (apply, clean up);
//! - [`health`]: the WorkloadGroup's readiness probe, whose verdicts the
//!   xDS proxy reports to the control plane;
//! - [`status`]: the status port (15020): readiness and merged metrics,
//!   with Istio's metrics under Istio's names and labels ([`istio_metrics`]);
//! - [`dns`]: the DNS proxy (15053): mesh names from the name table the
//!   xDS proxy receives, everything else forwarded to resolv.conf's upstreams;
//! - [`onboarding_files`]: the files that bring a VM into the mesh — their
//!   names, Istio's paths, what they say (written by `vmesh workload entry
//!   configure`) and reading them back on the VM;
//! - [`workload`]: the workload, resolved from the operator's options over
//!   the onboarding files, and what follows from it (the agent's
//!   configuration, Envoy's bootstrap, the capture rules, its IP).
//!
//! It does not own: the `vmesh agent` command line (flags, signals, the
//! order things start in: the binary's `agent.rs`), nor the control plane's
//! side of port 15012 (the server crate serves ADS and the CA there and
//! checks that a stream's node matches its client certificate).
//!
//! ```no_run
//! use vmesh_agent::agent::{self, AgentConfig};
//! use vmesh_agent::bootstrap::Bootstrap;
//! use vmesh_ca::SpiffeId;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let id = SpiffeId::new("cluster.local", "vm-workloads", "payment-service-sa")?;
//! let mut config = AgentConfig::new(
//!     id,
//!     "istiod.istio-system.svc:15012",
//!     "/etc/certs/root-cert.pem",
//!     "/var/lib/vmesh/agent/certs",
//!     "/var/run/vmesh",
//! );
//! config.token_file = Some("/var/run/secrets/tokens/istio-token".into());
//! let (stop, shutdown) = tokio::sync::watch::channel(false);
//! let agent = agent::start(config, shutdown).await?;
//! let bootstrap = Bootstrap::new(
//!     "10.0.0.5".parse()?, "payment-vm1", "vm-workloads",
//!     agent.xds_socket(), agent.sds_socket(),
//! );
//! std::fs::write("/etc/istio/proxy/envoy-rev.json", bootstrap.render())?;
//! // … start Envoy with `-c /etc/istio/proxy/envoy-rev.json`; later:
//! stop.send_replace(true);
//! agent.wait().await?;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod bootstrap;
pub mod capture;
pub mod child;
pub mod dns;
pub mod envoy;
pub mod health;
pub mod identity;
pub mod istio_metrics;
pub mod onboarding_files;
pub mod sds;
pub mod status;
mod uds;
pub mod upstream;
pub mod workload;
pub mod xds_proxy;

pub use agent::{AgentConfig, AgentError, AgentHandle};
pub use identity::{CertificateManager, Credentials, IdentityHandle};

/// An error and its sources, `: `-joined, for logs (tonic's transport
/// errors say little at the top level).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Serde for durations as (fractional) seconds, for config dumps.
pub(crate) mod duration_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&d.as_secs_f64()),
                None => s.serialize_none(),
            }
        }

        #[allow(dead_code)]
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<f64>::deserialize(d)?
                .map(|secs| Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

/// Resolves once `shutdown` is true or its sender is gone. (Wrapping
/// `wait_for` keeps its non-`Send` borrow out of `select!` outputs.)
pub(crate) async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
