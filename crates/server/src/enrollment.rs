//! A server joining a control plane on a shared store (etcd) without a CA
//! of its own gets an intermediate from a server that holds the root: it
//! makes a key, leaves a certificate request among the store's records,
//! and waits for the root holder to sign it. The key never leaves the
//! server; only the request and the signed certificate pass through etcd.
//! The intermediate is kept in `<data-dir>/ca/intermediate`, so the server
//! starts again without the root holder.
//!
//! Whoever can write the store's records can enroll a server, exactly as
//! whoever can write etcd can change everything else the mesh runs on: etcd
//! access is the trust here. Operators who want more give each server an
//! intermediate by hand (`vmesh ca intermediate`) and this never runs.
//!
//! This module owns the records of enrollment and the files it leaves; the
//! signing is [`vmesh_ca::Authority::sign_intermediate`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use vmesh_store::Store;

use crate::identity::{Identity, IdentityError, PluggedCa};

/// Requests waiting for the root holder, by id.
const REQUESTS: &str = "ca-enrollment/requests/";
/// Signed intermediates waiting for their server, by id.
const ISSUED: &str = "ca-enrollment/issued/";
/// Where an enrolled server keeps its intermediate, under `<data-dir>/ca`.
const ENROLLED_DIR: &str = "intermediate";
/// How long a server waits for a root holder to sign.
const WAIT: Duration = Duration::from_secs(60);
/// How often the root holder looks for requests, and a waiting server for
/// its certificate.
const POLL: Duration = Duration::from_millis(250);
/// An enrolled intermediate's life.
const INTERMEDIATE_LIFE: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Serialize, Deserialize)]
struct Request {
    name: String,
    csr: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Answer {
    Issued { cert: String, chain: String },
    Refused { reason: String },
}

/// The intermediate this server enrolled for before, if it did.
pub fn enrolled(ca_dir: &Path) -> Option<PluggedCa> {
    let dir = ca_dir.join(ENROLLED_DIR);
    let [cert, key, chain, _] = vmesh_ca::INTERMEDIATE_FILES.map(|f| dir.join(f));
    (cert.exists() && key.exists() && chain.exists()).then_some(PluggedCa {
        cert,
        key,
        chain: Some(chain),
    })
}

/// Asks the servers holding the root for an intermediate and waits for
/// it, then keeps it under `ca_dir`.
pub fn enroll(
    store: &Store,
    ca_dir: &Path,
    trust_domain: &str,
) -> Result<PluggedCa, IdentityError> {
    let failed = |why: String| IdentityError::Enrollment(why);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("server-{}", &id[..12]);
    let (csr, key) = vmesh_ca::intermediate_request(&name, trust_domain)?;
    let request = serde_json::to_vec(&Request { name, csr }).map_err(|e| failed(e.to_string()))?;
    store.write_records(vec![(format!("{REQUESTS}{id}"), Some(request))])?;
    tracing::info!(%id, "no CA of this server's own on a shared store: asking a server that holds the root for an intermediate");
    let deadline = tokio::time::Instant::now() + WAIT;
    let answer = loop {
        if let Some(bytes) = store.record(&format!("{ISSUED}{id}"))? {
            break serde_json::from_slice::<Answer>(&bytes)
                .map_err(|e| failed(format!("an unreadable answer: {e}")))?;
        }
        if tokio::time::Instant::now() > deadline {
            store.write_records(vec![(format!("{REQUESTS}{id}"), None)])?;
            return Err(failed(format!(
                "no server holding the root signed this server's intermediate within {WAIT:?}: start the server that holds the root (its <data-dir>/ca), or give this one an intermediate with vmesh ca intermediate"
            )));
        }
        std::thread::sleep(POLL);
    };
    store.write_records(vec![(format!("{ISSUED}{id}"), None)])?;
    let (cert, chain) = match answer {
        Answer::Issued { cert, chain } => (cert, chain),
        Answer::Refused { reason } => {
            return Err(failed(format!("the root holder refused: {reason}")));
        }
    };
    let root = chain_root(&chain).ok_or_else(|| failed("the signed chain has no root".into()))?;
    let dir: PathBuf = ca_dir.join(ENROLLED_DIR);
    vmesh_ca::write_intermediate_files(&dir, &cert, &chain, &key, &root)?;
    tracing::info!(dir = %dir.display(), "enrolled: this server issues under the mesh's root");
    enrolled(ca_dir).ok_or_else(|| failed(format!("{} is incomplete", dir.display())))
}

/// The last certificate of a PEM chain.
fn chain_root(chain: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    chain.rfind(BEGIN).map(|at| chain[at..].to_string())
}

/// On a server holding the root, until shutdown: signs every enrollment
/// request in the store.
pub async fn sign_requests(identity: Arc<Identity>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let identity = identity.clone();
        let signed = tokio::task::spawn_blocking(move || sign_pending(&identity)).await;
        match signed {
            // The store's own fault is reported where it is watched (/ready).
            Ok(Err(IdentityError::Store(vmesh_store::StoreError::Unavailable(_)))) => {}
            Ok(Err(e)) => tracing::warn!("signing enrollment requests: {e}"),
            _ => {}
        }
    }
}

fn sign_pending(identity: &Identity) -> Result<(), IdentityError> {
    let store = identity.store();
    for (record, bytes) in store.records(REQUESTS)? {
        let Some(id) = record.strip_prefix(REQUESTS) else {
            continue;
        };
        let answer = match serde_json::from_slice::<Request>(&bytes) {
            Ok(request) => match identity.authority.sign_intermediate(
                &request.csr,
                &request.name,
                INTERMEDIATE_LIFE,
            ) {
                Ok((cert, chain)) => {
                    tracing::info!(%id, name = %request.name, "signed a server's intermediate");
                    Answer::Issued { cert, chain }
                }
                Err(e) => Answer::Refused {
                    reason: e.to_string(),
                },
            },
            Err(e) => Answer::Refused {
                reason: format!("unreadable request: {e}"),
            },
        };
        let answer =
            serde_json::to_vec(&answer).map_err(|e| IdentityError::Enrollment(e.to_string()))?;
        // The answer and the request's removal together: a request is
        // answered once, whichever root holder gets to it.
        if store.swap_record(&record, Some(&bytes), None)? {
            store.write_records(vec![(format!("{ISSUED}{id}"), Some(answer))])?;
        }
    }
    Ok(())
}
