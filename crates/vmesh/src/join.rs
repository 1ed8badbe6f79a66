//! `vmesh agent join`: the VM's side of the one-line join.
//!
//! It fetches the mesh root from the server without trusting it, checks it
//! against the `--ca-hash` pin (as `kubeadm join` checks its CA), and only
//! then sends the join token, over TLS verified with that root, to get the
//! onboarding files ([`vmesh_agent::onboarding_files::BUNDLE`], nothing
//! else); they are unpacked into a private directory, installed by their
//! own install.sh, and removed.
//!
//! Starting the agent afterwards is the caller's (`vmesh agent`).

use std::net::ToSocketAddrs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use vmesh_agent::onboarding_files::{self, BundleFile};

use crate::agent::JoinArgs;

const SERVER_NAME: &str = vmesh_ca::ISTIOD_SERVICE_NAME;
const TIMEOUT: Duration = Duration::from_secs(15);
/// The mesh root as the server at `server` presents it, checked against `pin`.
async fn pinned_root(server: &str, pin: &str) -> Result<String> {
    // Unverified on purpose: nothing secret is sent, and what comes back is
    // believed only if it matches the pin.
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .danger_accept_invalid_certs(true)
        .build()?;
    let url = format!("https://{server}{}", vmesh_server::join::ROOT_PATH);
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("fetching the mesh root from {url}"))?;
    if !response.status().is_success() {
        bail!("{url}: HTTP {}", response.status());
    }
    let root = response.text().await?;
    let hash = vmesh_ca::root_hash(&root).with_context(|| format!("{url}: not a certificate"))?;
    if !hash.eq_ignore_ascii_case(pin.trim()) {
        bail!(
            "the server at {server} presents a mesh root whose hash is {hash}, not {pin}: \
             refusing to send it the join token"
        );
    }
    Ok(root)
}

/// The onboarding archive, for the join token, from the server verified by `root`.
async fn fetch_bundle(server: &str, root: &str, token: &str) -> Result<Vec<u8>> {
    let address = server
        .to_socket_addrs()
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("{server} has no address"))?;
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes())?)
        // The server's certificate names istiod, whatever address reaches it.
        .resolve(SERVER_NAME, address)
        .build()?;
    let url = format!(
        "https://{SERVER_NAME}:{}{}",
        address.port(),
        vmesh_server::join::BOOTSTRAP_PATH
    );
    let response = client
        .get(&url)
        .bearer_auth(token.trim())
        .send()
        .await
        .with_context(|| format!("joining through {server}"))?;
    let status = response.status();
    let body = response.bytes().await?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("the server at {server} refused the join ({status}): {message}");
    }
    Ok(body.to_vec())
}

/// Unpacks the archive into `dir`, accepting only the onboarding files.
fn unpack(archive: &[u8], dir: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    archive.set_preserve_permissions(true);
    for entry in archive
        .entries()
        .context("reading the onboarding archive")?
    {
        let mut entry = entry.context("reading the onboarding archive")?;
        let name = entry.path()?.to_string_lossy().into_owned();
        if BundleFile::named(&name).is_none() || !entry.header().entry_type().is_file() {
            bail!("the onboarding archive holds {name:?}, which is not an onboarding file");
        }
        entry.unpack(dir.join(&name))?;
    }
    for file in onboarding_files::BUNDLE {
        if !dir.join(file.name).is_file() {
            bail!("the onboarding archive lacks {}", file.name);
        }
    }
    Ok(())
}

/// Joins: fetch, check, install. Returns whether systemd now runs the agent
/// (install.sh started its unit), so this process need not.
pub async fn join(args: &JoinArgs, root: Option<&Path>) -> Result<bool> {
    let root_pem = pinned_root(&args.join_server, &args.ca_hash).await?;
    let archive = fetch_bundle(&args.join_server, &root_pem, &args.token).await?;
    // The files hold a bootstrap token: unpacked where only we can read, and
    // removed once installed.
    let dir = tempfile::Builder::new()
        .prefix("vmesh-join-")
        .tempdir()
        .context("a private directory for the onboarding files")?;
    unpack(&archive, dir.path())?;
    let systemd = root.is_none() && Path::new("/run/systemd/system").is_dir();
    let mut install = Command::new("sh");
    install.arg(dir.path().join(onboarding_files::INSTALL_SH.name));
    if let Some(root) = root {
        install.env("ROOT", root);
    }
    if args.no_start || !systemd {
        install.env("VMESH_NO_START", "1");
    }
    let status = install.status().context("running install.sh")?;
    if !status.success() {
        bail!("install.sh failed ({status})");
    }
    println!("joined the mesh through {}", args.join_server);
    Ok(systemd && !args.no_start)
}
