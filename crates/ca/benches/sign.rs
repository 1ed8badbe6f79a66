//! CSR-signing throughput of the authority on every core: P-256 CSRs are
//! generated first, then signed across all available threads (2 on the
//! project's machines), each signature including the CSR's proof-of-possession
//! check. Prints the rate and its ratio to the target, measured in this run.
//!
//! `cargo bench -p vmesh-ca --bench sign` (optionally `-- <csr count>`).

use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use tokio::time::Instant;
use vmesh_ca::{Authority, AuthorityOptions, SpiffeId};

const TARGET_PER_SEC: f64 = 2000.0;

fn main() {
    let total: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(8000);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let dir = tempfile::tempdir().expect("temp dir");
    let authority = Arc::new(
        Authority::load_or_create(dir.path(), "cluster.local", AuthorityOptions::default())
            .expect("authority"),
    );
    let identity = SpiffeId::new("cluster.local", "bench", "workload").expect("identity");

    let started = Instant::now();
    let csrs: Vec<String> = (0..total)
        .map(|_| {
            let key = KeyPair::generate().expect("key");
            CertificateParams::default()
                .serialize_request(&key)
                .expect("csr")
                .pem()
                .expect("pem")
        })
        .collect();
    let generated_in = started.elapsed();

    // One warm-up signature outside the timing.
    authority
        .sign_workload(&csrs[0], &identity, None)
        .expect("sign");

    let chunk = total.div_ceil(threads);
    let csrs = Arc::new(csrs);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (authority, identity, csrs) = (authority.clone(), identity.clone(), csrs.clone());
            std::thread::spawn(move || {
                let end = ((t + 1) * chunk).min(csrs.len());
                let mut bytes = 0usize;
                for csr in &csrs[(t * chunk).min(end)..end] {
                    let chain = authority
                        .sign_workload(csr, &identity, Some(Duration::from_secs(3600)))
                        .expect("sign");
                    bytes += chain[0].len();
                }
                bytes
            })
        })
        .collect();
    let bytes: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
    let elapsed = started.elapsed();
    assert!(bytes > 0);

    let rate = total as f64 / elapsed.as_secs_f64();
    println!(
        "generated {total} P-256 CSRs in {:.2} s (not timed below)",
        generated_in.as_secs_f64()
    );
    println!(
        "signing: {rate:.0} CSRs/s on {threads} threads ({total} in {:.3} s; target >= {TARGET_PER_SEC:.0}, ratio {:.2})",
        elapsed.as_secs_f64(),
        rate / TARGET_PER_SEC
    );
}
