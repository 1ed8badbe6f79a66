//! `vmesh`: one binary for the control plane (`vmesh server`) and the CLI that
//! drives it (`apply`, `get`, `delete`, `label`, `validate`, `analyze`,
//! `create namespace|serviceaccount`).

#![forbid(unsafe_code)]

mod agent;
mod analyze;
mod bench;
mod client;
mod commands;
mod demo;
mod demo_app;
mod doctor;
mod join;
mod kubeconfig;
mod label;
mod load;
mod manifests;
mod onboarding;
mod output;
mod proxy_config;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc gives memory back to the system after a burst (thousands of
/// proxies connecting at once, a push to all of them), where glibc's
/// allocator kept the peak resident for good.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "vmesh",
    version,
    about = "A service mesh that makes virtual machines first-class members"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written to standard error: text for people, JSON
    /// (one object per line: timestamp, level, target, fields) for log
    /// pipelines.
    #[arg(
        long,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "VMESH_LOG_FORMAT",
        global = true
    )]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Where the CLI finds the server.
#[derive(Debug, clap::Args)]
struct Connection {
    /// Config API address.
    #[arg(
        long,
        env = "VMESH_SERVER",
        default_value = "http://127.0.0.1:15080",
        global = true
    )]
    server: String,
    /// Bearer token for the config API.
    #[arg(long, env = "VMESH_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// The CA certificate (PEM) an https:// server is trusted by: the mesh
    /// root, <data-dir>/ca/root-cert.pem on the server's machine.
    #[arg(long, env = "VMESH_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
}

/// The server's certificate authority.
#[derive(Debug, clap::Args)]
struct CaArgs {
    /// The mesh's trust domain (SPIFFE IDs are spiffe://<domain>/ns/<ns>/sa/<sa>).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// An operator's CA certificate (root or intermediate) instead of a root of our own.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The key of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The chain from --ca-cert's issuer up to the root.
    #[arg(long, requires = "ca_cert")]
    ca_chain: Option<PathBuf>,
    /// Workload certificate life when the caller asks for none.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    workload_cert_ttl: std::time::Duration,
    /// The longest workload certificate life a caller may ask for.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    max_workload_cert_ttl: std::time::Duration,
    /// Extra names for the xDS port's certificate (a gateway hostname or IP),
    /// and the config API's when it is served over TLS; repeatable.
    #[arg(long = "xds-san")]
    xds_sans: Vec<String>,
    /// Life of the serving certificates of the xDS port and the config API;
    /// each is renewed when two thirds of it have passed.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    serving_cert_ttl: std::time::Duration,
    /// Start even though the CA root is not the one the store was set up
    /// with, or <data-dir>/ca is gone: every VM must then get the new root.
    #[arg(long)]
    accept_new_root: bool,
}

/// How many connections the server's listeners admit, and for how long.
#[derive(Debug, clap::Args)]
struct ConnectionArgs {
    /// Connections open at once on all listeners together (lowered to what
    /// the open-file limit allows; the xDS port gets 10/16 of them, the
    /// config API 4/16).
    #[arg(long, default_value_t = 50_000)]
    max_connections: usize,
    /// Connections open at once from one source address, per listener.
    #[arg(long, default_value_t = 4_096)]
    max_connections_per_source: usize,
    /// A connection that sends nothing for this long is closed (a request
    /// head must arrive within it; HTTP/2 peers are pinged every third of it).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: std::time::Duration,
}

/// Where `vmesh server` keeps its objects.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// The store: redb: (the embedded store under --data-dir), or
    /// etcd://HOST:PORT[,HOST:PORT…][/PREFIX] (servers on one etcd and
    /// prefix are one control plane; the prefix defaults to vmesh).
    #[arg(long, env = "VMESH_STORE", default_value = "redb:")]
    store: String,
    /// The CA that signed etcd's certificates: talk to etcd over TLS.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// A client certificate for etcd (with --etcd-key), when etcd asks for one.
    #[arg(long, requires = "etcd_key", requires = "etcd_ca")]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert.
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

impl StoreArgs {
    fn location(&self, data_dir: &std::path::Path) -> anyhow::Result<vmesh_store::StoreLocation> {
        let mut location = vmesh_store::StoreLocation::parse(Some(&self.store), data_dir)
            .map_err(anyhow::Error::msg)?;
        match &mut location {
            vmesh_store::StoreLocation::Etcd(config) => {
                config.tls = self.etcd_ca.clone().map(|ca| vmesh_store::EtcdTls {
                    ca,
                    client: self.etcd_cert.clone().zip(self.etcd_key.clone()),
                });
            }
            vmesh_store::StoreLocation::Embedded(_) if self.etcd_ca.is_some() => {
                anyhow::bail!("--etcd-ca is for --store etcd://…");
            }
            vmesh_store::StoreLocation::Embedded(_) => {}
        }
        Ok(location)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane.
    Server {
        /// Directory for the embedded store and the CA's files.
        #[arg(long, default_value = "/var/lib/vmesh")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        /// Config API address; anything but loopback requires --api-token-file
        /// and is served over TLS only.
        #[arg(long, default_value = "127.0.0.1:15080")]
        api_addr: SocketAddr,
        /// File holding the admin bearer token for the config API.
        #[arg(long)]
        api_token_file: Option<PathBuf>,
        /// Serve the config API over TLS only, on loopback too. Off loopback it
        /// always is; on loopback it otherwise takes TLS and plain HTTP on the
        /// same port (kubectl sends a token only over TLS). Its certificate is
        /// from the mesh CA, whose root is <data-dir>/ca/root-cert.pem.
        #[arg(long)]
        api_tls: bool,
        /// Directory of manifests to load and follow.
        #[arg(long)]
        config_dir: Option<PathBuf>,
        /// xDS and the CA over TLS; every caller shows a mesh certificate or a token.
        #[arg(long, default_value = "0.0.0.0:15012")]
        xds_addr: SocketAddr,
        /// Plaintext xDS for local Envoys (loopback only), e.g. 127.0.0.1:15010.
        #[arg(long)]
        xds_plaintext_addr: Option<SocketAddr>,
        #[command(flatten)]
        ca: Box<CaArgs>,
        /// Readiness and proxy sync status (loopback only).
        #[arg(long, default_value = "127.0.0.1:15014")]
        monitoring_addr: SocketAddr,
        /// How long an auto-registered WorkloadEntry outlives its VM's last connection.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        auto_registration_grace: std::time::Duration,
        #[command(flatten)]
        connections: ConnectionArgs,
        /// How often the store is backed up into <data-dir>/backups when it
        /// changed (also at every start; the newest 3 are kept).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        backup_interval: std::time::Duration,
    },
    /// What is wrong with the mesh: refused registrations, unhealthy or
    /// disconnected entries, proxies that refused config, and what `vmesh
    /// analyze -A` finds in the server's objects. Exit 1 on failures.
    Doctor {
        #[command(flatten)]
        connection: Connection,
        /// The server's monitoring address [default: --server's host, port 15014].
        #[arg(long, env = "VMESH_MONITORING")]
        monitoring: Option<String>,
    },
    /// Find configuration mistakes in files or in the server's objects, as
    /// istioctl analyze does. Exit 1 on errors.
    #[command(long_about = analyze::ABOUT)]
    Analyze(analyze::AnalyzeArgs),
    /// A proxy's clusters, listeners, routes, endpoints, secrets and
    /// bootstrap, as the server sent them (PROXY) or as Envoy runs them
    /// (--local, on the VM); Envoy's log levels; the agent's DNS table.
    #[command(visible_alias = "pc")]
    ProxyConfig {
        #[command(subcommand)]
        what: proxy_config::ProxyConfigCommand,
    },
    /// Show every connected proxy and whether it runs the latest config.
    ProxyStatus {
        #[command(flatten)]
        connection: Connection,
        /// The server's monitoring address [default: --server's host, port 15014].
        #[arg(long, env = "VMESH_MONITORING")]
        monitoring: Option<String>,
    },
    /// Check manifests without a server: exit 0 only when all are valid.
    Validate {
        /// Files or directories (`-` for standard input).
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<String>,
    },
    /// Create or update objects from manifests, all or nothing.
    Apply {
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<String>,
        /// Namespace for objects that do not name one.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show objects, and the Endpoints the server computes for each Service.
    Get {
        /// Kind: name, plural or short name (we, wg, se, dr, vs, pa, ap, ep, …).
        kind: String,
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// yaml, json, wide or name.
        #[arg(short = 'o', long)]
        output: Option<output::Format>,
        /// Only objects whose labels match, as kubectl's -l: `app=web`,
        /// `tier!=db`, `env in (a,b)`, `!canary`.
        #[arg(short = 'l', long, conflicts_with = "name")]
        selector: Option<String>,
        /// Only objects whose fields match: `metadata.name=…`, `metadata.namespace!=…`.
        #[arg(long, conflicts_with = "name")]
        field_selector: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete objects named in manifests, or one by kind and name.
    Delete {
        #[arg(short = 'f', long = "filename", num_args = 1.., conflicts_with_all = ["kind", "name"])]
        files: Vec<String>,
        #[arg(required_unless_present = "files")]
        kind: Option<String>,
        #[arg(required_unless_present = "files")]
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Add, change (--overwrite) or remove labels of an object, as kubectl
    /// label does: `vmesh label namespace vm-workloads istio-injection=enabled`.
    Label {
        /// `KIND NAME` or `KIND/NAME`, then `key=value` to set and `key-` to remove.
        #[arg(required = true, num_args = 2..)]
        args: Vec<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Change a label that already has another value.
        #[arg(long)]
        overwrite: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Print a kubeconfig for the server, so that kubectl, client-go and
    /// kube-rs reach it: `vmesh kubeconfig > ~/.kube/vmesh && kubectl
    /// --kubeconfig ~/.kube/vmesh get we -A`. Carries the token when one is given.
    Kubeconfig {
        /// The name of the cluster, user and context in the kubeconfig.
        #[arg(long, default_value = "vmesh")]
        name: String,
        /// The context's default namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Take a snapshot of the whole store from a running server (embedded
    /// or etcd): every object and the server's own records, as of one
    /// revision. The file (mode 0600) holds Secrets and join records.
    Backup {
        /// Where the snapshot goes.
        #[arg(short = 'o', long)]
        output: PathBuf,
        #[command(flatten)]
        connection: Connection,
    },
    /// Put a snapshot from `vmesh backup` into an empty store, with no
    /// server running on it: the embedded store in --data-dir, or etcd
    /// (--store etcd://…). From redb to etcd, this moves a mesh.
    Restore {
        /// The snapshot.
        #[arg(long)]
        from: PathBuf,
        #[arg(long, default_value = "/var/lib/vmesh")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Run the guide's payment-service example end to end on this machine.
    Demo {
        /// Leave it running with instructions to explore.
        #[arg(long)]
        keep: bool,
        /// Remove everything a previous run left behind.
        #[arg(long, conflicts_with = "keep")]
        down: bool,
    },
    /// Send HTTP requests and report codes, answering workloads and latency as JSON.
    #[command(hide = true)]
    Load(load::LoadArgs),
    /// The demo's HTTP application (answers with its name and version).
    #[command(hide = true)]
    DemoApp {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "v1")]
        version: String,
        /// `/health` answers 503 while this file exists.
        #[arg(long)]
        unhealthy_file: Option<std::path::PathBuf>,
    },
    /// Create an object from the command line.
    Create {
        #[command(subcommand)]
        what: CreateCommand,
    },
    /// Run beside Envoy on a workload: its certificate, SDS and xDS, and Envoy itself.
    Agent(Box<agent::AgentArgs>),
    /// Onboarding VMs: WorkloadGroups and the files one VM needs (istioctl x workload).
    Workload(onboarding::WorkloadArgs),
    /// istioctl's experimental commands under their istioctl path: `vmesh x
    /// workload entry configure …` is `vmesh workload entry configure …`.
    #[command(visible_alias = "x")]
    Experimental {
        #[command(subcommand)]
        what: ExperimentalCommand,
    },
    /// Check the server's store, or restore it from a backup (with the
    /// server stopped).
    Store {
        #[command(subcommand)]
        what: StoreCommand,
    },
    /// Load harnesses: `bench xds` drives a control plane with simulated proxies.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// The CA of a control plane of several servers: an intermediate for
    /// each, under one root kept offline.
    Ca {
        #[command(subcommand)]
        what: CaCommand,
    },
    /// Bootstrap tokens for workloads (audience istio-ca).
    Token {
        #[command(subcommand)]
        what: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ExperimentalCommand {
    /// Onboarding VMs (`vmesh workload`).
    Workload(onboarding::WorkloadArgs),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Check a store file (or a backup) as the server does at start: every
    /// page and every object. Exit 1 if it is damaged.
    Check {
        /// The server's data directory; its store.redb is checked.
        #[arg(long, default_value = "/var/lib/vmesh", conflicts_with = "file")]
        data_dir: PathBuf,
        /// A store file or backup to check instead.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Put the newest good backup (from <data-dir>/backups, taken at every
    /// start and hourly), or --from, in place of the store. The replaced
    /// file is kept as store.redb.damaged-<time>. The server must be stopped.
    Restore {
        #[arg(long, default_value = "/var/lib/vmesh")]
        data_dir: PathBuf,
        /// A backup to restore instead of the newest good one.
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Make one server's intermediate CA under the root in --root-dir
    /// (created on first use: keep that directory offline), written into
    /// --out as ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem.
    /// Start that server with --ca-cert, --ca-key and --ca-chain from it.
    Intermediate {
        /// The offline root: root-cert.pem and root-key.pem.
        #[arg(long)]
        root_dir: PathBuf,
        /// Where the server's files go (created 0700; the key 0600).
        #[arg(long)]
        out: PathBuf,
        /// The server's name, in the certificate's subject.
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// The intermediate's life (never past the root's).
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Simulated proxies on delta and state-of-the-world ADS, a stream of
    /// changes of every kind, and how fast each reaches every proxy.
    Xds(bench::XdsBench),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issue a token for a service account; prints the token alone.
    Create {
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// How long the token is valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[command(flatten)]
        connection: Connection,
    },
    /// Revoke every token issued to a service account so far, or one by --id.
    Revoke {
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// The token's id (its `jti`).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
enum CreateCommand {
    /// Create a namespace.
    #[command(visible_alias = "ns")]
    Namespace {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Create a service account: the identity a WorkloadGroup's VMs get.
    #[command(visible_alias = "sa")]
    Serviceaccount {
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        connection: Connection,
    },
}

/// clap suggests the closest spelling of a mistyped flag, aliases included,
/// so `--ingressip` drew `--ingress-ip`, an alias kept for habit, rather
/// than istioctl's documented `--ingressIP`: the suggestion is replaced by
/// the flag's own name.
fn prefer_documented_spelling(mut error: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(suggested)) = error.get(ContextKind::SuggestedArg).cloned()
    else {
        return error;
    };
    let Some(alias) = suggested.strip_prefix("--") else {
        return error;
    };
    fn primary(command: &clap::Command, alias: &str) -> Option<String> {
        command
            .get_arguments()
            .find(|a| {
                a.get_all_aliases()
                    .into_iter()
                    .flatten()
                    .any(|n| n == alias)
            })
            .and_then(|a| a.get_long())
            .map(str::to_string)
            .or_else(|| command.get_subcommands().find_map(|c| primary(c, alias)))
    }
    if let Some(long) = primary(&<Cli as clap::CommandFactory>::command(), alias) {
        error.insert(
            ContextKind::SuggestedArg,
            ContextValue::String(format!("--{long}")),
        );
    }
    error
}

fn main() -> ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|e| prefer_documented_spelling(e).exit());
    // The demo prints its own report; only problems should interrupt it.
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMESH_LOG")
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
