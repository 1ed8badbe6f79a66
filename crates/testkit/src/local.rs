//! `vmesh server` on free loopback ports, in this machine's own network
//! namespace (no root needed), stopped when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::process::{self, GRACE};

/// A `vmesh server` process with its API, monitoring and TLS xDS ports on
/// 127.0.0.1, chosen by the kernel; the addresses it printed.
pub struct LocalServer {
    child: Child,
    vmesh: PathBuf,
    api: String,
    monitoring: String,
    xds: String,
    xds_plaintext: Option<String>,
    /// Held open for as long as the server runs.
    _stdout: BufReader<ChildStdout>,
}

impl std::fmt::Debug for LocalServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalServer")
            .field("api", &self.api)
            .finish()
    }
}

impl LocalServer {
    /// Starts `vmesh server --data-dir data_dir` with `extra` flags and
    /// `envs`, its standard error discarded, and reads where it listens.
    pub fn start(
        vmesh: &Path,
        data_dir: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<LocalServer> {
        let mut child = Self::command_for(vmesh, data_dir, extra)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} server", vmesh.display()))?;
        let mut stdout = BufReader::new(child.stdout.take().context("the server's stdout")?);
        let (mut api, mut monitoring, mut xds, mut xds_plaintext) = (None, None, None, None);
        // `vmesh server: <what> on <address>`, the TLS port last.
        while xds.is_none() {
            let mut line = String::new();
            if stdout.read_line(&mut line)? == 0 {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("vmesh server exited ({status}) before saying where it listens");
            }
            let line = line
                .trim()
                .strip_prefix("vmesh server: ")
                .unwrap_or_default();
            let Some((what, addr)) = line.rsplit_once(" on ") else {
                continue;
            };
            let slot = match what {
                "config API" => &mut api,
                "monitoring" => &mut monitoring,
                "plaintext xDS" => &mut xds_plaintext,
                "xDS and CA over TLS" => &mut xds,
                _ => continue,
            };
            *slot = Some(addr.to_string());
        }
        let mut server = LocalServer {
            child,
            vmesh: vmesh.to_path_buf(),
            api: String::new(),
            monitoring: String::new(),
            xds: xds.unwrap_or_default(),
            xds_plaintext,
            _stdout: stdout,
        };
        server.api = api.context("the server did not print its API address")?;
        server.monitoring =
            monitoring.context("the server did not print its monitoring address")?;
        if !["http://127.0.0.1:", "https://127.0.0.1:"]
            .iter()
            .any(|prefix| server.api.starts_with(prefix))
        {
            bail!("unexpected API address {:?}", server.api);
        }
        Ok(server)
    }

    /// A server for Kubernetes clients under `dir` (its data in
    /// `dir/data`): the config API with `token`, and the kubeconfig `vmesh
    /// kubeconfig --token` writes for it. With `tls_only` the server runs
    /// with `--api-tls` and the kubeconfig is given the root file
    /// (`--ca-file`); without, the server takes TLS and plain HTTP and the
    /// kubeconfig finds both the TLS address and the root itself. Started
    /// again on the same `dir`, it is the same server restarted.
    pub fn start_for_kubernetes(
        vmesh: &Path,
        dir: &Path,
        token: &str,
        tls_only: bool,
    ) -> Result<(LocalServer, String)> {
        let token_file = dir.join("token");
        std::fs::write(&token_file, token)?;
        let token_file = token_file.to_str().context("a UTF-8 path")?;
        let mut flags = vec!["--api-token-file", token_file];
        if tls_only {
            flags.push("--api-tls");
        }
        let server = LocalServer::start(vmesh, &dir.join("data"), &flags, &[])?;
        if server.api().starts_with("https://") != tls_only {
            bail!("the API is not served as asked: {}", server.api());
        }
        let mut kubeconfig = server.command(&["kubeconfig", "--token", token]);
        if tls_only {
            kubeconfig
                .arg("--ca-file")
                .arg(dir.join("data/ca/root-cert.pem"));
        }
        let output = kubeconfig.output()?;
        if !output.status.success() {
            bail!(
                "vmesh kubeconfig failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok((server, String::from_utf8(output.stdout)?))
    }

    /// `vmesh server --data-dir data_dir` on free loopback ports with
    /// `extra` flags, not started: what [`LocalServer::start`] runs, for a
    /// test that expects the server to refuse to start.
    pub fn command_for(vmesh: &Path, data_dir: &Path, extra: &[&str]) -> Command {
        let mut command = Command::new(vmesh);
        command
            .args(["server", "--data-dir"])
            .arg(data_dir)
            .args([
                "--api-addr",
                "127.0.0.1:0",
                "--monitoring-addr",
                "127.0.0.1:0",
                "--xds-addr",
                "127.0.0.1:0",
            ])
            .args(extra);
        command
    }

    /// The config API's URL (`http://127.0.0.1:…`, `https://` with `--api-tls`).
    pub fn api(&self) -> &str {
        &self.api
    }

    /// The monitoring URL (`http://127.0.0.1:…`).
    pub fn monitoring(&self) -> &str {
        &self.monitoring
    }

    /// The TLS port of xDS and the CA (`127.0.0.1:…`).
    pub fn xds(&self) -> &str {
        &self.xds
    }

    /// The plaintext xDS port, when `--xds-plaintext-addr` was given.
    pub fn xds_plaintext(&self) -> Option<&str> {
        self.xds_plaintext.as_deref()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `vmesh args…` against this server (`VMESH_SERVER`), without a token.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.vmesh);
        command
            .args(args)
            .env("VMESH_SERVER", &self.api)
            .env_remove("VMESH_TOKEN");
        command
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        process::terminate(std::slice::from_mut(&mut self.child), &[], GRACE);
    }
}
