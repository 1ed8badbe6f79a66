//! `vmesh proxy-config` (istioctl's): a proxy's clusters, listeners,
//! routes, endpoints, secrets and bootstrap, from one of three sources:
//!
//! - the server's view (`PROXY`, its node id or `NAME.NAMESPACE`): what the
//!   server computed for that connected proxy, from its monitoring port's
//!   `/debug/config_dump?proxyID=` (Istio's);
//! - `--local`, on the VM: what Envoy runs, from its admin interface
//!   (`/config_dump?include_eds`, `/clusters?format=json` for endpoints),
//!   certificates included;
//! - `-f FILE`: a saved config dump.
//!
//! `proxy-config log` sets the local Envoy's log levels (`POST /logging`),
//! and `proxy-config dns` shows the agent's DNS table. The tables are
//! `tables.rs` and `secrets.rs`; this module fetches and prints.

mod secrets;
mod tables;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::client::Client;
use tables::{ClusterFilter, EndpointFilter, ListenerFilter};

/// Envoy's admin interface as the agent configures it.
const ENVOY_ADMIN: &str = "http://127.0.0.1:15000";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// istioctl's table.
    Short,
    Json,
    Yaml,
}

/// Where the configuration comes from.
#[derive(Debug, clap::Args)]
pub struct Source {
    /// The proxy, from the server's view: its node id or NAME.NAMESPACE
    /// (`vmesh proxy-status` lists them).
    proxy: Option<String>,
    /// The proxy's namespace, as istioctl's `PROXY -n NAMESPACE` gives it
    /// (NAME becomes NAME.NAMESPACE).
    #[arg(short = 'n', long, requires = "proxy")]
    namespace: Option<String>,
    /// What Envoy on this machine runs, from its admin interface (on the VM).
    #[arg(long, conflicts_with_all = ["proxy", "file"])]
    local: bool,
    /// An Envoy config dump in JSON (for `endpoint`, also Envoy's
    /// `/clusters?format=json`).
    #[arg(short = 'f', long = "file", conflicts_with = "proxy")]
    file: Option<PathBuf>,
    /// The server's monitoring address.
    #[arg(
        long,
        env = "VMESH_MONITORING",
        default_value = "http://127.0.0.1:15014"
    )]
    monitoring: String,
    /// Envoy's admin interface, for --local.
    #[arg(long, env = "VMESH_ENVOY_ADMIN", default_value = ENVOY_ADMIN)]
    admin: String,
    /// short (a table), json or yaml.
    #[arg(short = 'o', long, value_enum)]
    output: Option<Format>,
}

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Clusters whose FQDN contains this.
    #[arg(long)]
    fqdn: Option<String>,
    /// Clusters of this port.
    #[arg(long)]
    port: Option<u16>,
    /// Clusters whose subset contains this.
    #[arg(long)]
    subset: Option<String>,
    /// inbound or outbound.
    #[arg(long)]
    direction: Option<String>,
}

impl From<&ClusterArgs> for ClusterFilter {
    fn from(args: &ClusterArgs) -> ClusterFilter {
        ClusterFilter {
            fqdn: args.fqdn.clone(),
            port: args.port,
            subset: args.subset.clone(),
            direction: args.direction.clone(),
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum ProxyConfigCommand {
    /// Clusters: SERVICE FQDN, PORT, SUBSET, DIRECTION, TYPE, DESTINATION RULE.
    #[command(visible_aliases = ["clusters", "c"])]
    Cluster {
        #[command(flatten)]
        source: Source,
        #[command(flatten)]
        filter: ClusterArgs,
    },
    /// Listeners, one row per filter chain: ADDRESSES, PORT, MATCH, DESTINATION.
    #[command(visible_aliases = ["listeners", "l"])]
    Listener {
        #[command(flatten)]
        source: Source,
        /// Listeners on this address.
        #[arg(long)]
        address: Option<String>,
        /// Listeners on this port.
        #[arg(long)]
        port: Option<u16>,
        /// HTTP, TCP, HTTP+TCP or UNKNOWN.
        #[arg(long = "type")]
        kind: Option<String>,
    },
    /// Routes: NAME, VHOST NAME, DOMAINS, MATCH, VIRTUAL SERVICE.
    #[command(visible_aliases = ["routes", "r"])]
    Route {
        #[command(flatten)]
        source: Source,
        /// The route configuration of this name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Endpoints: ENDPOINT, STATUS, OUTLIER CHECK, CLUSTER.
    #[command(visible_aliases = ["endpoints", "ep"])]
    Endpoint {
        #[command(flatten)]
        source: Source,
        /// Endpoints of this address (without port).
        #[arg(long)]
        address: Option<String>,
        /// Endpoints on this port.
        #[arg(long)]
        port: Option<u16>,
        /// Endpoints of this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// HEALTHY, UNHEALTHY, DRAINING, TIMEOUT, DEGRADED or UNKNOWN.
        #[arg(long)]
        status: Option<String>,
    },
    /// Secrets and their certificates: RESOURCE NAME, TYPE, STATUS, VALID
    /// CERT, SERIAL NUMBER, NOT AFTER, NOT BEFORE. The agent serves them on
    /// the VM: use --local there.
    #[command(visible_aliases = ["secrets", "s"])]
    Secret {
        #[command(flatten)]
        source: Source,
    },
    /// The bootstrap (JSON by default; `-o short` for the versions).
    #[command(visible_alias = "b")]
    Bootstrap {
        #[command(flatten)]
        source: Source,
    },
    /// Everything above.
    #[command(visible_alias = "a")]
    All {
        #[command(flatten)]
        source: Source,
        #[command(flatten)]
        clusters: ClusterArgs,
        /// Print a heading before each table.
        #[arg(long)]
        with_headers: bool,
    },
    /// Envoy's log levels on this machine: shows them, or sets them with
    /// --level (`debug` for every logger, `http:debug,upstream:trace` for
    /// some).
    #[command(visible_alias = "o")]
    Log {
        /// [<logger>:]<level>,…; levels: trace, debug, info, warning,
        /// error, critical, off.
        #[arg(long)]
        level: Option<String>,
        /// Every logger back to warning.
        #[arg(short = 'r', long, conflicts_with = "level")]
        reset: bool,
        /// Envoy's admin interface.
        #[arg(long, env = "VMESH_ENVOY_ADMIN", default_value = ENVOY_ADMIN)]
        admin: String,
    },
    /// The DNS proxy's mesh names and addresses, upstreams and search domains.
    Dns {
        /// The agent's status port.
        #[arg(
            long,
            env = "VMESH_AGENT_STATUS",
            default_value = "http://127.0.0.1:15020"
        )]
        status: String,
        /// Print the agent's JSON as it is.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: ProxyConfigCommand) -> Result<ExitCode> {
    match command {
        ProxyConfigCommand::Cluster { source, filter } => {
            let dump = source.dump().await?;
            let clusters = tables::clusters(&dump, &(&filter).into());
            show(source.output, &clusters, tables::cluster_table)?;
        }
        ProxyConfigCommand::Listener {
            source,
            address,
            port,
            kind,
        } => {
            let dump = source.dump().await?;
            let filter = ListenerFilter {
                address,
                port,
                kind,
            };
            let listeners = tables::listeners(&dump, &filter);
            show(source.output, &listeners, tables::listener_table)?;
        }
        ProxyConfigCommand::Route { source, name } => {
            let dump = source.dump().await?;
            let routes = tables::routes(&dump, name.as_deref());
            show(source.output, &routes, tables::route_table)?;
        }
        ProxyConfigCommand::Endpoint {
            source,
            address,
            port,
            cluster,
            status,
        } => {
            let filter = EndpointFilter {
                address,
                port,
                cluster,
                status,
            };
            endpoints(&source, &filter).await?;
        }
        ProxyConfigCommand::Secret { source } => {
            let dump = source.dump().await?;
            if source.proxy.is_some() {
                eprintln!(
                    "note: the server sends no secrets; the VM's agent serves them over SDS \
                     (run `vmesh proxy-config secret --local` there)"
                );
            }
            match source.output.unwrap_or(Format::Short) {
                Format::Short => print!(
                    "{}",
                    secrets::secret_table(&secrets::secrets(&dump, SystemTime::now()))
                ),
                format => print_value(
                    tables::section(&dump, "SecretsConfigDump").unwrap_or(&Value::Null),
                    format,
                )?,
            }
        }
        ProxyConfigCommand::Bootstrap { source } => {
            let dump = source.dump().await?;
            match source.output.unwrap_or(Format::Json) {
                Format::Short => print!("{}", secrets::bootstrap_summary(&dump)),
                format => print_value(
                    tables::section(&dump, "BootstrapConfigDump").unwrap_or(&Value::Null),
                    format,
                )?,
            }
        }
        ProxyConfigCommand::All {
            source,
            clusters,
            with_headers,
        } => {
            let dump = source.dump().await?;
            match source.output.unwrap_or(Format::Short) {
                Format::Short => print!("{}", summary(&dump, &(&clusters).into(), with_headers)),
                format => print_value(&dump, format)?,
            }
        }
        ProxyConfigCommand::Log {
            level,
            reset,
            admin,
        } => log(&admin, level.as_deref(), reset).await?,
        ProxyConfigCommand::Dns { status, json } => {
            let url = format!(
                "{}{}",
                status.trim_end_matches('/'),
                vmesh_agent::status::DNS_DUMP_PATH
            );
            let dump = local_json(&url, "the agent's status port", "VMESH_AGENT_STATUS").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&dump)?);
            } else {
                print!("{}", crate::output::dns_table(&dump));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

impl Source {
    /// The config dump, with endpoints.
    async fn dump(&self) -> Result<Value> {
        if let Some(file) = &self.file {
            return read_file(file);
        }
        if self.local {
            let url = format!("{}/config_dump?include_eds", self.admin_base());
            return local_json(&url, "Envoy's admin interface", "VMESH_ENVOY_ADMIN").await;
        }
        let Some(proxy) = self.proxy_query() else {
            bail!(
                "which proxy? Give PROXY (its id or NAME.NAMESPACE, as `vmesh proxy-status` \
                 lists them) for the server's view, --local on the VM for what its Envoy runs, \
                 or -f FILE"
            );
        };
        let mut query = reqwest::Url::parse("http://localhost/")?;
        query
            .query_pairs_mut()
            .append_pair("proxyID", &proxy)
            .append_pair("include_eds", "true");
        let path = format!(
            "{}?{}",
            vmesh_server::monitoring::CONFIG_DUMP_PATH,
            query.query().unwrap_or_default()
        );
        Ok(Client::monitoring(&self.monitoring)?
            .get(
                &path,
                &format!("reading the configuration of proxy {proxy}"),
            )
            .await?)
    }

    /// The proxy as the server finds it: `PROXY -n NAMESPACE` is
    /// `PROXY.NAMESPACE` unless PROXY is a node id or names its namespace.
    fn proxy_query(&self) -> Option<String> {
        let proxy = self.proxy.as_deref()?;
        Some(match &self.namespace {
            Some(ns) if !proxy.contains('.') && !proxy.contains('~') => format!("{proxy}.{ns}"),
            _ => proxy.to_string(),
        })
    }

    fn admin_base(&self) -> &str {
        self.admin.trim_end_matches('/')
    }
}

fn read_file(file: &std::path::Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))
}

/// GET `url` on this machine (Envoy's admin, the agent's status port): JSON.
async fn local_json(url: &str, what: &str, variable: &str) -> Result<Value> {
    let response = reqwest::get(url)
        .await
        .with_context(|| format!("cannot reach {what} at {url} (set {variable})"))?;
    if !response.status().is_success() {
        bail!(
            "{url}: {}",
            response.text().await.unwrap_or_default().trim()
        );
    }
    response
        .json()
        .await
        .with_context(|| format!("{url}: the answer is not JSON"))
}

/// The table of `items`, or the items themselves as JSON or YAML.
fn show(format: Option<Format>, items: &[&Value], table: fn(&[&Value]) -> String) -> Result<()> {
    match format.unwrap_or(Format::Short) {
        Format::Short => print!("{}", table(items)),
        format => print_value(&json!(items), format)?,
    }
    Ok(())
}

fn print_value(value: &Value, format: Format) -> Result<()> {
    match format {
        Format::Yaml => print!("{}", serde_saphyr::to_string(value)?),
        _ => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

/// `endpoint`: as Envoy runs them with --local (or a `/clusters` file),
/// else as the server sent them.
async fn endpoints(source: &Source, filter: &EndpointFilter) -> Result<()> {
    let statuses = if source.local {
        let url = format!("{}/clusters?format=json", source.admin_base());
        Some(local_json(&url, "Envoy's admin interface", "VMESH_ENVOY_ADMIN").await?)
    } else if let Some(file) = &source.file {
        Some(read_file(file)?).filter(|v| !v["cluster_statuses"].is_null())
    } else {
        None
    };
    let format = source.output.unwrap_or(Format::Short);
    match (statuses, format) {
        (Some(statuses), Format::Short) => print!(
            "{}",
            tables::endpoint_table(&tables::endpoints_of_clusters(&statuses, filter))
        ),
        (Some(statuses), format) => {
            let clusters: Vec<&Value> = statuses["cluster_statuses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| {
                    let one = json!({"cluster_statuses": [c]});
                    !tables::endpoints_of_clusters(&one, filter).is_empty()
                })
                .collect();
            print_value(&json!(clusters), format)?;
        }
        (None, Format::Short) => print!(
            "{}",
            tables::endpoint_table(&tables::endpoints_of_dump(&source.dump().await?, filter))
        ),
        (None, format) => {
            let dump = source.dump().await?;
            print_value(&json!(tables::load_assignments(&dump, filter)), format)?;
        }
    }
    Ok(())
}

/// `all -o short`: every table, as istioctl prints them one after another.
fn summary(dump: &Value, clusters: &ClusterFilter, with_headers: bool) -> String {
    let sections = [
        ("BOOTSTRAP INFO", secrets::bootstrap_summary(dump)),
        (
            "CLUSTER INFO",
            tables::cluster_table(&tables::clusters(dump, clusters)),
        ),
        (
            "LISTENER INFO",
            tables::listener_table(&tables::listeners(dump, &ListenerFilter::default())),
        ),
        (
            "ROUTE INFO",
            tables::route_table(&tables::routes(dump, None)),
        ),
        (
            "SECRET INFO",
            secrets::secret_table(&secrets::secrets(dump, SystemTime::now())),
        ),
        (
            "ENDPOINTS INFO",
            tables::endpoint_table(&tables::endpoints_of_dump(dump, &EndpointFilter::default())),
        ),
    ];
    sections
        .iter()
        .map(|(heading, table)| {
            if with_headers {
                format!("------ {heading} ------\n\n{table}")
            } else {
                table.clone()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Envoy's log levels, as istioctl names them.
const LEVELS: [&str; 7] = [
    "trace", "debug", "info", "warning", "error", "critical", "off",
];

/// `--level` as Envoy's `/logging` parameters: `level=L` (every logger)
/// first, then `logger=L` for each named one. `loggers` is Envoy's list.
fn logging_parameters(spec: &str, loggers: &str) -> Result<Vec<(String, String)>> {
    let level = |name: &str| -> Result<String> {
        let name = if name == "warn" { "warning" } else { name };
        if LEVELS.contains(&name) {
            Ok(name.to_string())
        } else {
            bail!(
                "unrecognized logging level: {name} (one of {})",
                LEVELS.join(", ")
            )
        }
    };
    let mut every = None;
    let mut some = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        // istioctl allows a namespace before `::`.
        let part = part.rsplit("::").next().unwrap_or(part);
        match part.split_once([':', '=']) {
            None => every = Some(level(part)?),
            Some(("level", l)) => every = Some(level(l)?),
            Some((logger, l)) => {
                if !loggers.contains(logger) {
                    bail!("unrecognized logger name: {logger}");
                }
                some.push((logger.to_string(), level(l)?));
            }
        }
    }
    Ok(every
        .map(|l| ("level".to_string(), l))
        .into_iter()
        .chain(some)
        .collect())
}

/// `proxy-config log`: POSTs to Envoy's `/logging` and prints its answer
/// (every logger and its level).
async fn log(admin: &str, level: Option<&str>, reset: bool) -> Result<()> {
    let url = format!("{}/logging", admin.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let post = |query: Vec<(String, String)>| {
        let request = client.post(&url).query(&query);
        let url = url.clone();
        async move {
            let response = request.send().await.with_context(|| {
                format!("cannot reach Envoy's admin interface at {url} (set VMESH_ENVOY_ADMIN)")
            })?;
            let code = response.status();
            let text = response.text().await.unwrap_or_default();
            if !code.is_success() {
                bail!("{url}: {code}: {}", text.trim());
            }
            anyhow::Ok(text)
        }
    };
    let current = post(Vec::new()).await?;
    let parameters = match (level, reset) {
        (_, true) => vec![("level".to_string(), "warning".to_string())],
        (Some(spec), false) => logging_parameters(spec, &current)?,
        (None, false) => Vec::new(),
    };
    let mut answer = current;
    for parameter in parameters {
        answer = post(vec![parameter]).await?;
    }
    print!("{answer}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_flag_names_the_proxy_as_istioctl_does() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            source: Source,
        }
        let query = |args: &[&str]| {
            <Cli as clap::Parser>::parse_from(std::iter::once("pc").chain(args.iter().copied()))
                .source
                .proxy_query()
        };
        assert_eq!(
            query(&["payment-vm", "-n", "vm-workloads"]).as_deref(),
            Some("payment-vm.vm-workloads")
        );
        assert_eq!(
            query(&["payment-vm.vm-workloads", "-n", "other"]).as_deref(),
            Some("payment-vm.vm-workloads")
        );
        let id = "sidecar~10.0.0.1~vm1.ns~ns.svc.cluster.local";
        assert_eq!(query(&[id, "-n", "ns"]).as_deref(), Some(id));
        assert_eq!(query(&["--local"]), None);
    }

    const LOGGERS: &str = "active loggers:\n  admin: info\n  http: info\n  upstream: info\n";

    #[test]
    fn log_levels_as_istioctl_reads_them() {
        let pairs = |spec| logging_parameters(spec, LOGGERS).unwrap();
        assert_eq!(pairs("debug"), [("level".into(), "debug".into())]);
        assert_eq!(
            pairs("http:debug,upstream=trace,warn"),
            [
                ("level".to_string(), "warning".to_string()),
                ("http".into(), "debug".into()),
                ("upstream".into(), "trace".into())
            ]
        );
        assert_eq!(pairs("envoy::http:off"), [("http".into(), "off".into())]);
        assert!(logging_parameters("loud", LOGGERS).is_err());
        assert!(logging_parameters("nosuch:debug", LOGGERS).is_err());
    }
}
