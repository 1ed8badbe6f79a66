//! The control planes the benchmark drives: `vmesh server` (this binary,
//! started on free loopback ports, written to through its config API) and,
//! for comparison, Istio's `pilot-discovery` (reading the same objects as
//! files from its `--configDir`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use vmesh_testkit::LocalServer;

use crate::client::Client;

/// Objects per apply request: well under the API's body limit.
const APPLY_BATCH: usize = 500;

pub enum Target {
    Vmesh {
        server: LocalServer,
        api: Client,
        /// Whether its store is in etcd.
        on_etcd: bool,
    },
    Istiod {
        child: Child,
        config_dir: PathBuf,
        xds: String,
        version: String,
    },
}

impl Target {
    /// `vmesh server` with its data in `dir` and its objects in `store`
    /// (an `etcd://` URL) or the embedded store, holding `objects`.
    pub async fn vmesh(dir: &Path, objects: &[Value], store: Option<&str>) -> Result<Target> {
        let exe = std::env::current_exe().context("this program's path")?;
        let mut flags = vec!["--xds-plaintext-addr", "127.0.0.1:0"];
        if let Some(store) = store {
            flags.extend(["--store", store]);
        }
        let server = LocalServer::start(&exe, &dir.join("data"), &flags, &[("VMESH_LOG", "warn")])?;
        let api = Client::config_api(&crate::Connection {
            server: server.api().to_string(),
            token: None,
            ca_file: None,
        })?;
        let target = Target::Vmesh {
            server,
            api,
            on_etcd: store.is_some(),
        };
        for batch in objects.chunks(APPLY_BATCH) {
            target.write(batch).await?;
        }
        Ok(target)
    }

    /// Istio's `pilot-discovery`, built and run by `peer` (the repository's
    /// `scripts/istiod-peer.sh`, which knows how it runs without
    /// Kubernetes), reading `objects` from files under `dir`, serving
    /// plaintext xDS on a free loopback port.
    pub async fn istiod(peer: &Path, dir: &Path, objects: &[Value]) -> Result<Target> {
        let config_dir = dir.join("istiod-config");
        std::fs::create_dir_all(&config_dir)?;
        for object in objects {
            write_file(&config_dir, object)?;
        }
        let built = Command::new(peer)
            .arg("build")
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {} build", peer.display()))?;
        let binary = String::from_utf8_lossy(&built.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        if !built.status.success() || binary.is_empty() {
            bail!("{} build failed", peer.display());
        }
        let version = istio_version(Path::new(&binary))?;
        let xds_port = free_port()?;
        let child = Command::new(peer)
            .arg("run")
            .arg(&config_dir)
            .arg(xds_port.to_string())
            .args(["--", "--log_output_level=default:warn"])
            // istiod admits 25 new streams a second on 2 cores and refuses
            // the rest: the benchmark measures pushes, not that throttle.
            .env("PILOT_MAX_REQUESTS_PER_SECOND", "10000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.join("istiod.log"))?))
            .spawn()
            .with_context(|| format!("starting {} (from {})", binary, peer.display()))?;
        let xds = format!("127.0.0.1:{xds_port}");
        let target = Target::Istiod {
            child,
            config_dir,
            xds: xds.clone(),
            version,
        };
        // Ready when it accepts connections on its xDS port.
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(&xds).await.is_ok() {
                return Ok(target);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        bail!(
            "istiod did not listen on {xds} within 30 s; see {}",
            dir.join("istiod.log").display()
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            Target::Vmesh { on_etcd: false, .. } => "vmesh",
            Target::Vmesh { on_etcd: true, .. } => "vmesh-etcd",
            Target::Istiod { .. } => "istiod",
        }
    }

    /// Its plaintext xDS URL.
    pub fn xds_url(&self) -> String {
        match self {
            Target::Vmesh { server, .. } => {
                format!("http://{}", server.xds_plaintext().unwrap_or_default())
            }
            Target::Istiod { xds, .. } => format!("http://{xds}"),
        }
    }

    pub fn pid(&self) -> u32 {
        match self {
            Target::Vmesh { server, .. } => server.pid(),
            Target::Istiod { child, .. } => child.id(),
        }
    }

    /// The Istio version the proxies claim (istiod refuses what it does not support).
    pub fn istio_version(&self) -> String {
        match self {
            Target::Vmesh { .. } => "1.28.0".to_string(),
            Target::Istiod { version, .. } => version.clone(),
        }
    }

    /// Creates or replaces `objects`, all at once.
    pub async fn write(&self, objects: &[Value]) -> Result<()> {
        match self {
            Target::Vmesh { api, .. } => {
                api.post(
                    "/apis/vmesh.io/v1/apply",
                    &json!({"items": objects}),
                    "applying the benchmark's objects",
                )
                .await?;
            }
            Target::Istiod { config_dir, .. } => {
                for object in objects {
                    write_file(config_dir, object)?;
                }
            }
        }
        Ok(())
    }

    /// Deletes `objects`.
    pub async fn delete(&self, objects: &[Value]) -> Result<()> {
        for object in objects {
            match self {
                Target::Vmesh { api, .. } => {
                    let kind = vmesh_api::registry::find_kind(
                        object["apiVersion"].as_str().unwrap_or_default(),
                        object["kind"].as_str().unwrap_or_default(),
                    )
                    .with_context(|| format!("the kind of {object}"))?;
                    let path = kind.path(
                        object["metadata"]["namespace"].as_str(),
                        object["metadata"]["name"].as_str(),
                    );
                    api.delete(&path, "deleting a benchmark object").await?;
                }
                Target::Istiod { config_dir, .. } => {
                    std::fs::remove_file(config_dir.join(file_name(object)))?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Target::Istiod { child, .. } = self {
            vmesh_testkit::process::terminate(
                std::slice::from_mut(child),
                &[],
                vmesh_testkit::process::GRACE,
            );
        }
    }
}

fn file_name(object: &Value) -> String {
    format!(
        "{}-{}.yaml",
        object["kind"].as_str().unwrap_or_default().to_lowercase(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// Writes one object as its own file, atomically (JSON is YAML).
fn write_file(dir: &Path, object: &Value) -> Result<()> {
    let name = file_name(object);
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, serde_json::to_vec_pretty(object)?)?;
    std::fs::rename(&partial, dir.join(name))?;
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `pilot-discovery version -s`: its version, as proxies must claim it.
fn istio_version(binary: &Path) -> Result<String> {
    let output = Command::new(binary)
        .args(["version", "-s"])
        .output()
        .with_context(|| format!("running {} version", binary.display()))?;
    let printed = String::from_utf8_lossy(&output.stdout);
    let version = printed
        .trim()
        .trim_start_matches("client version:")
        .trim()
        .to_string();
    if !output.status.success() || version.is_empty() {
        bail!("{} version -s said nothing", binary.display());
    }
    Ok(version)
}
