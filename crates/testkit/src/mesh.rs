//! vmesh in network namespaces: `vmesh server` in the control plane's
//! namespace, the CLI against it, onboarding the guide's way (`vmesh
//! workload entry configure --autoregister`, then the generated
//! `install.sh` under a root of its own), `vmesh agent` beside Envoy in a
//! VM's namespace, and `vmesh load`.
//!
//! A [`Mesh`] names the binary, the control plane's namespace and the
//! directories for data, onboarding files, agents' work directories and
//! logs. Its methods return errors; tests unwrap them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::netns::{self, Namespace};
use crate::poll;

/// How long the server's API and the objects it makes may take to appear.
pub const WAIT: Duration = Duration::from_secs(10);

/// The vmesh binary and its control plane, in network namespaces.
#[derive(Debug, Clone)]
pub struct Mesh {
    vmesh: String,
    control: String,
    dir: PathBuf,
    logs: PathBuf,
    envoy: Option<PathBuf>,
}

impl Mesh {
    /// `vmesh` run inside namespaces; the server in `control`; data, files,
    /// work directories and logs under `dir`.
    pub fn new(vmesh: &str, control: &Namespace, dir: &Path) -> Mesh {
        Mesh {
            vmesh: vmesh.to_string(),
            control: control.name().to_string(),
            dir: dir.to_path_buf(),
            logs: dir.to_path_buf(),
            envoy: None,
        }
    }

    /// Logs go to `logs` instead of the directory.
    pub fn with_logs(mut self, logs: &Path) -> Mesh {
        self.logs = logs.to_path_buf();
        self
    }

    /// The Envoy binary agents run.
    pub fn with_envoy(mut self, envoy: &Path) -> Mesh {
        self.envoy = Some(envoy.to_path_buf());
        self
    }

    pub fn vmesh(&self) -> &str {
        &self.vmesh
    }

    /// The control plane's namespace.
    pub fn control(&self) -> &str {
        &self.control
    }

    /// Where the log named `name` is.
    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(name)
    }

    /// `vmesh args…` for `ip netns exec`.
    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut full = vec![self.vmesh.as_str()];
        full.extend_from_slice(args);
        full
    }

    /// Starts `vmesh server` in `ns` (the control plane's), its data in
    /// `data` under the directory, its log `server.log`, with `flags`
    /// (`--xds-addr`, …), and waits until its API answers. Returns the
    /// process's index in `ns`.
    pub fn start_server(&self, ns: &Namespace, flags: &[&str]) -> Result<usize> {
        if ns.name() != self.control {
            bail!("the server runs in {}, not {}", self.control, ns.name());
        }
        let data = self.dir.join("data");
        let data = data.to_str().context("a data directory in UTF-8")?;
        let mut args = self.args(&["server", "--data-dir", data]);
        args.extend_from_slice(flags);
        let index = ns.spawn(&args, &self.log("server.log"))?;
        poll::until("the server's API", WAIT, || {
            self.cli_output(&["get", "ns"])
                .ok()
                .filter(|o| o.status.success())
        })?;
        Ok(index)
    }

    /// The CLI, run in the control plane's namespace, as it ended.
    pub fn cli_output(&self, args: &[&str]) -> Result<Output> {
        netns::command_in(&self.control, &self.args(args))
            .output()
            .context("running vmesh with ip netns exec")
    }

    /// The CLI in the control plane's namespace: its standard output, or an
    /// error with its standard error.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let output = self.cli_output(args)?;
        if !output.status.success() {
            bail!(
                "vmesh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `vmesh get args… -o json`, if it succeeds and is JSON.
    pub fn get_json(&self, args: &[&str]) -> Option<Value> {
        let mut full = vec!["get"];
        full.extend_from_slice(args);
        full.extend(["-o", "json"]);
        serde_json::from_str(&self.cli(&full).ok()?).ok()
    }

    /// Writes `yaml` to `file` in the directory and applies it.
    pub fn apply(&self, file: &str, yaml: &str) -> Result<String> {
        let path = self.dir.join(file);
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        self.apply_file(&path)
    }

    /// `vmesh apply -f path`.
    pub fn apply_file(&self, path: &Path) -> Result<String> {
        self.cli(&["apply", "-f", path.to_str().context("a path in UTF-8")?])
    }

    /// The WorkloadEntry `namespace/name` as JSON, if it exists.
    pub fn entry(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get_json(&["we", name, "-n", namespace])
    }

    /// The virtual IP the server allocated to `host`, once it has.
    pub fn vip_of(&self, host: &str) -> Result<String> {
        poll::until(&format!("a VIP for {host}"), WAIT, || {
            let vips = self.get_json(&["cm", "vmesh-vip-allocations", "-n", "istio-system"])?;
            Some(vips["data"][host].as_str()?.to_string())
        })
    }

    /// Onboards a VM of `group` (in `namespace`) the guide's way: the files
    /// from `vmesh workload entry configure --autoregister` in
    /// `onboarding-<group>`, placed by the generated `install.sh` under
    /// `root-<group>`, which it returns.
    pub fn onboard(&self, group: &str, namespace: &str, ingress_host: &str) -> Result<PathBuf> {
        let files = self.dir.join(format!("onboarding-{group}"));
        self.cli(&[
            "workload",
            "entry",
            "configure",
            "--name",
            group,
            "-n",
            namespace,
            "-o",
            files.to_str().context("a path in UTF-8")?,
            "--autoregister",
            "--ingressHost",
            ingress_host,
        ])?;
        let root = self.dir.join(format!("root-{group}"));
        let install = Command::new("sh")
            .arg(files.join("install.sh"))
            .env("ROOT", &root)
            .env("VMESH_NO_START", "1")
            .output()
            .context("running install.sh")?;
        if !install.status.success() {
            bail!(
                "install.sh for {group}: {}",
                String::from_utf8_lossy(&install.stderr).trim()
            );
        }
        Ok(root)
    }

    fn envoy(&self) -> Result<&str> {
        self.envoy
            .as_deref()
            .context("no Envoy binary given (Mesh::with_envoy)")?
            .to_str()
            .context("an Envoy path in UTF-8")
    }

    /// Starts `vmesh agent --capture` in `ns` from onboarding files
    /// installed under `root` (by [`onboard`](Self::onboard), or by the
    /// `join …` in `flags`), as the VM `name` at `ip` with Envoy's
    /// `base_id`: its work directory `work-<name>`, its log
    /// `agent-<name>.log`. Returns the process's index in `ns`.
    pub fn start_onboarded_agent(
        &self,
        ns: &Namespace,
        root: &Path,
        name: &str,
        ip: &str,
        base_id: u32,
        flags: &[&str],
    ) -> Result<usize> {
        let work = self.dir.join(format!("work-{name}"));
        let base_id = base_id.to_string();
        let mut args = self.args(&[
            "agent",
            "--root",
            root.to_str().context("a path in UTF-8")?,
            "--work-dir",
            work.to_str().context("a path in UTF-8")?,
            "--ip",
            ip,
            "--name",
            name,
            "--envoy",
            self.envoy()?,
            "--base-id",
            &base_id,
            "--capture",
        ]);
        args.extend_from_slice(flags);
        ns.spawn(&args, &self.log(&format!("agent-{name}.log")))
    }

    /// Starts `vmesh agent` (and so Envoy) in `ns`, named after it, with a
    /// fresh token for `namespace/account` and the mesh root from the
    /// `istio-ca-root-cert` ConfigMap, both in `agent-<ns>` (its work
    /// directory too), dialing `server`; more agent `flags` (`--label
    /// k=v`, …). Returns the process's index in `ns`.
    #[allow(clippy::too_many_arguments)]
    pub fn start_agent(
        &self,
        ns: &Namespace,
        server: &str,
        namespace: &str,
        account: &str,
        ip: &str,
        flags: &[&str],
        base_id: u32,
    ) -> Result<usize> {
        let work = self.dir.join(format!("agent-{}", ns.name()));
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let token = self.cli(&[
            "token",
            "create",
            "-n",
            namespace,
            "--service-account",
            account,
        ])?;
        std::fs::write(work.join("istio-token"), token.trim())?;
        let root = poll::until("the root ConfigMap", WAIT, || {
            let object = self.get_json(&["cm", "istio-ca-root-cert", "-n", namespace])?;
            Some(object["data"]["root-cert.pem"].as_str()?.to_string())
        })?;
        std::fs::write(work.join("root-cert.pem"), root)?;
        let utf8 = |path: PathBuf| path.to_str().map(str::to_string).context("a path in UTF-8");
        let (root_cert, token_file) = (
            utf8(work.join("root-cert.pem"))?,
            utf8(work.join("istio-token"))?,
        );
        let work = utf8(work)?;
        let base_id = base_id.to_string();
        let mut args = self.args(&[
            "agent",
            "--server",
            server,
            "-n",
            namespace,
            "--service-account",
            account,
            "--root-cert",
            &root_cert,
            "--token-file",
            &token_file,
            "--work-dir",
            &work,
            "--ip",
            ip,
            "--name",
            ns.name(),
            "--envoy",
            self.envoy()?,
            // Envoys share /dev/shm across network namespaces.
            "--base-id",
            &base_id,
        ]);
        args.extend_from_slice(flags);
        ns.spawn(&args, &self.log(&format!("agent-{}.log", ns.name())))
    }

    /// `vmesh load --url url args…` run in `ns`: its JSON summary.
    pub fn load(&self, ns: &Namespace, url: &str, args: &[&str]) -> Result<Value> {
        let mut full = self.args(&["load", "--url", url]);
        full.extend_from_slice(args);
        let text = ns.exec(&full)?;
        serde_json::from_str(&text).with_context(|| format!("vmesh load's summary: {text}"))
    }
}

/// Sends `ns`'s connections to the service range (10.96.0.0/16) through
/// its sidecar's 15001, from source address `ip` (the agent's own capture
/// is tested on its own; this keeps everything else direct).
pub fn capture_service_range(ns: &Namespace, ip: &str) -> Result<()> {
    ns.exec(&["ip", "route", "add", "10.96.0.0/16", "dev", "lo", "src", ip])?;
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "10.96.0.0/16",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ])?;
    Ok(())
}

/// Sends connections arriving at `ports` in `ns` to its sidecar's inbound
/// 15006, as the agent's own capture would (tested on its own).
pub fn capture_inbound(ns: &Namespace, ports: &[u16]) -> Result<()> {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "-m",
        "multiport",
        "--dports",
        &ports.join(","),
        "-j",
        "REDIRECT",
        "--to-ports",
        "15006",
    ])?;
    Ok(())
}
