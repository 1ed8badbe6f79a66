//! Onboarding, as `istioctl x workload …` does it:
//!
//! - `vmesh workload group create` prints a WorkloadGroup for `vmesh apply -f -`;
//! - `vmesh workload entry configure` writes what one VM of a group needs into
//!   a directory: Istio's `cluster.env`, `mesh.yaml`, `istio-token`,
//!   `root-cert.pem` and `hosts`, and vmesh's `vmesh-agent.service` and
//!   `install.sh`, which places them at Istio's paths on the VM;
//! - `vmesh workload entry configure --join` hands the same files (without a
//!   token) to the server under a join token and prints the one line a VM
//!   runs, `vmesh agent join …`; `vmesh workload join-token revoke` ends it.
//!
//! What the files are called, what they say and where they go on the VM is
//! [`vmesh_agent::onboarding_files`]'s; this module reads the group, the mesh
//! settings, a token and the mesh root from the server and has the files
//! written.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Map, Value, json};
use vmesh_agent::onboarding_files::{
    self as files, BundleFile, DEFAULT_CLUSTER_ID, Onboarding, WorkloadIp, istiod_host, with_port,
};
use vmesh_api::kinds::workload_group::{self, WorkloadGroupSpec};
use vmesh_api::mesh::MeshSettings;
use vmesh_server::identity::ROOT_CONFIG_MAP;

use crate::Connection;
use crate::client::Client;

/// The annotation whose YAML ProxyConfig is merged into `defaultConfig`.
const PROXY_CONFIG_ANNOTATION: &str = "proxy.istio.io/config";
/// The key of the mesh root in [`ROOT_CONFIG_MAP`] (the server's publisher writes it).
const ROOT_CERT_KEY: &str = "root-cert.pem";
/// How long `configure` waits for the server to publish the mesh root in a new namespace.
const ROOT_CERT_WAIT: Duration = Duration::from_secs(5);

/// `vmesh workload …`
#[derive(Debug, clap::Args)]
pub struct WorkloadArgs {
    #[command(subcommand)]
    what: WorkloadCommand,
}

#[derive(Debug, Subcommand)]
enum WorkloadCommand {
    /// WorkloadGroups: the template the VMs of one kind are onboarded from.
    Group {
        #[command(subcommand)]
        what: GroupCommand,
    },
    /// One VM of a WorkloadGroup.
    Entry {
        #[command(subcommand)]
        what: EntryCommand,
    },
    /// Join tokens (made by `workload entry configure --join`).
    JoinToken {
        #[command(subcommand)]
        what: JoinTokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum JoinTokenCommand {
    /// Refuse further joins with a group's join tokens (all, or --id's).
    Revoke(JoinRevokeArgs),
}

#[derive(Debug, clap::Args)]
struct JoinRevokeArgs {
    /// The WorkloadGroup.
    #[arg(long)]
    name: String,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Only this join token (its id); default every one of the group.
    #[arg(long)]
    id: Option<String>,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Print a WorkloadGroup (apply it with `vmesh apply -f -`).
    Create(GroupCreateArgs),
}

#[derive(Debug, Subcommand)]
enum EntryCommand {
    /// Write the files that bring one VM of a WorkloadGroup into the mesh.
    Configure(Box<ConfigureArgs>),
}

#[derive(Debug, clap::Args)]
struct GroupCreateArgs {
    /// The group's name.
    #[arg(long)]
    name: String,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Labels of the group's workloads, `k=v,k2=v2`; repeatable.
    #[arg(short = 'l', long, value_delimiter = ',', value_parser = parse_key_value)]
    labels: Vec<(String, String)>,
    /// Annotations of the group's workloads, `k=v,k2=v2`; repeatable.
    #[arg(short = 'a', long, value_delimiter = ',', value_parser = parse_key_value)]
    annotations: Vec<(String, String)>,
    /// Ports the workloads serve, `name=port,…`; repeatable.
    #[arg(short = 'p', long, value_delimiter = ',', value_parser = parse_port)]
    ports: Vec<(String, u32)>,
    /// The identity of the group's workloads.
    #[arg(
        short = 's',
        long = "serviceAccount",
        alias = "service-account",
        default_value = "default"
    )]
    service_account: String,
}

#[derive(Debug, clap::Args)]
struct ConfigureArgs {
    /// A WorkloadGroup manifest (`-` for standard input) instead of the server's.
    #[arg(
        short = 'f',
        long = "file",
        conflicts_with = "name",
        required_unless_present = "name"
    )]
    file: Option<String>,
    /// The WorkloadGroup on the server.
    #[arg(long)]
    name: Option<String>,
    /// The group's namespace (with -f: for a manifest that names none).
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// The directory to write the files into (created if missing).
    #[arg(short = 'o', long = "output", required_unless_present = "join")]
    output: Option<PathBuf>,
    /// Instead of writing the files, give them to the server under a join
    /// token and print the `vmesh agent join` line a VM runs to fetch them.
    #[arg(long, conflicts_with = "output")]
    join: bool,
    /// How many VMs may join with the token.
    #[arg(long = "join-uses", default_value_t = 1, requires = "join")]
    join_uses: u32,
    /// How long the join token may be used.
    #[arg(long = "join-duration", default_value = "1h", value_parser = parse_duration, requires = "join")]
    join_duration: Duration,
    /// The control plane's cluster (default: the mesh's clusterName, else Kubernetes).
    #[arg(long = "clusterID", alias = "cluster-id")]
    cluster_id: Option<String>,
    /// The VM's network (default: the group template's).
    #[arg(long)]
    network: Option<String>,
    /// The gateway's (or server's) IP: `hosts` maps istiod.istio-system.svc
    /// to it. Empty: the address of --ingressService, as istioctl does.
    #[arg(
        long = "ingressIP",
        alias = "ingress-ip",
        conflicts_with = "ingress_host"
    )]
    ingress_ip: Option<String>,
    /// The Service whose address `hosts` uses when --ingressIP gives none,
    /// `name[.namespace]` (namespace istio-system): its load balancer's IP,
    /// else its first `externalIPs` entry [default: istio-eastwestgateway].
    #[arg(
        long = "ingressService",
        alias = "ingress-service",
        conflicts_with = "ingress_host"
    )]
    ingress_service: Option<String>,
    /// The VM's own address (cluster.env's ISTIO_SVC_IP): the proxy's IP and
    /// its WorkloadEntry's address [default: the address that reaches the server].
    #[arg(
        long = "internalIP",
        alias = "internal-ip",
        conflicts_with = "external_ip"
    )]
    internal_ip: Option<IpAddr>,
    /// An address in front of the VM (NAT) that others reach it at: as
    /// --internalIP, and probes stay on localhost.
    #[arg(long = "externalIP", alias = "external-ip")]
    external_ip: Option<IpAddr>,
    /// The gateway's (or server's) host name, `host[:port]`: the VM dials it
    /// directly (the server's xDS certificate must name it: `vmesh server --xds-san`).
    #[arg(long = "ingressHost", alias = "ingress-host")]
    ingress_host: Option<String>,
    /// The VM registers itself (a WorkloadEntry appears when it connects).
    #[arg(long)]
    autoregister: bool,
    /// The bootstrap token's life: `1h`, `30m`, or seconds as istioctl takes them.
    #[arg(long = "tokenDuration", alias = "token-duration", default_value = "1h", value_parser = parse_duration)]
    token_duration: Duration,
    /// DNS capture by the agent (`--capture-dns=false` to turn off; default: the mesh's, else on).
    #[arg(long = "capture-dns", num_args = 0..=1, default_missing_value = "true")]
    capture_dns: Option<bool>,
    /// The control plane revision: its address is istiod-<revision>.istio-system.svc.
    #[arg(long)]
    revision: Option<String>,
    /// The identity, for a group whose template names none (must agree if it does).
    #[arg(long = "serviceAccount", alias = "service-account")]
    service_account: Option<String>,
    /// The mesh's trust domain (default: the mesh configuration's, else cluster.local).
    #[arg(long = "trustDomain", alias = "trust-domain")]
    trust_domain: Option<String>,
    #[command(flatten)]
    connection: Connection,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{text:?} is not key=value")),
    }
}

fn parse_port(text: &str) -> Result<(String, u32), String> {
    let (name, port) = parse_key_value(text).map_err(|_| format!("{text:?} is not name=port"))?;
    match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok((name, p)),
        _ => Err(format!(
            "port {port:?} of {name:?} is not a number from 1 to 65535"
        )),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?,
    };
    if duration.as_secs() == 0 {
        return Err("the token must live at least a second".into());
    }
    Ok(duration)
}

pub async fn run(args: WorkloadArgs) -> Result<ExitCode> {
    match args.what {
        WorkloadCommand::Group {
            what: GroupCommand::Create(args),
        } => group_create(args),
        WorkloadCommand::Entry {
            what: EntryCommand::Configure(args),
        } => configure(*args).await,
        WorkloadCommand::JoinToken {
            what: JoinTokenCommand::Revoke(args),
        } => revoke_join(args).await,
    }
}

/// The WorkloadGroup `group create` prints, as istioctl shapes it.
fn group_manifest(args: &GroupCreateArgs) -> Value {
    let map = |pairs: &[(String, String)]| -> BTreeMap<String, String> {
        pairs.iter().cloned().collect()
    };
    let mut meta = Map::new();
    if !args.labels.is_empty() {
        meta.insert("labels".into(), json!(map(&args.labels)));
    }
    if !args.annotations.is_empty() {
        meta.insert("annotations".into(), json!(map(&args.annotations)));
    }
    let mut template = Map::new();
    template.insert("serviceAccount".into(), json!(args.service_account));
    if !args.ports.is_empty() {
        let ports: BTreeMap<&str, u32> = args.ports.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        template.insert("ports".into(), json!(ports));
    }
    let mut spec = Map::new();
    if !meta.is_empty() {
        spec.insert("metadata".into(), Value::Object(meta));
    }
    spec.insert("template".into(), Value::Object(template));
    json!({
        "apiVersion": workload_group::KIND.preferred_api_version(),
        "kind": workload_group::KIND.kind,
        "metadata": {"name": args.name, "namespace": args.namespace},
        "spec": spec,
    })
}

fn group_create(args: GroupCreateArgs) -> Result<ExitCode> {
    let yaml = serde_saphyr::to_string(&group_manifest(&args))?;
    // What we print must be what `vmesh apply` takes.
    let decoded = vmesh_api::decode_manifests("workload group create", &yaml);
    if decoded.has_errors() {
        for problem in &decoded.problems {
            eprintln!("{problem}");
        }
        return Ok(ExitCode::FAILURE);
    }
    print!("{yaml}");
    Ok(ExitCode::SUCCESS)
}

/// A WorkloadGroup as configure uses it.
struct Group {
    name: String,
    namespace: String,
    annotations: BTreeMap<String, String>,
    spec: WorkloadGroupSpec,
}

impl Group {
    fn from_object(object: &Value) -> Result<Group> {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
        let spec = serde_json::from_value(object["spec"].clone())
            .with_context(|| format!("WorkloadGroup {namespace}/{name}: unreadable spec"))?;
        let annotations =
            serde_json::from_value(object["metadata"]["annotations"].clone()).unwrap_or_default();
        Ok(Group {
            name: name.to_string(),
            namespace: namespace.to_string(),
            annotations,
            spec,
        })
    }
}

/// The group named by -f.
fn group_from_file(file: &str, namespace: &str) -> Result<Group> {
    let sources = crate::manifests::read_sources(&[file.to_string()])?;
    let decoded = vmesh_api::decode::decode_sources(
        sources.iter().map(|(n, t)| (n.as_str(), t.as_str())),
        namespace,
    );
    if decoded.has_errors() {
        for problem in &decoded.problems {
            eprintln!("{problem}");
        }
        bail!("{file}: not a valid manifest");
    }
    let groups: Vec<_> = decoded
        .objects
        .iter()
        .filter(|l| l.object.kind == workload_group::KIND.kind)
        .collect();
    match groups.as_slice() {
        [one] => Group::from_object(&serde_json::to_value(&one.object)?),
        [] => bail!("{file}: no WorkloadGroup in it"),
        many => bail!(
            "{file}: {} WorkloadGroups in it; give a file with one",
            many.len()
        ),
    }
}

/// Merges `overlay` into `base`, objects key by key.
fn merge(base: &mut Map<String, Value>, overlay: Map<String, Value>) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(Value::Object(inner)), Value::Object(over)) => merge(inner, over),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

async fn configure(args: ConfigureArgs) -> Result<ExitCode> {
    let api = Client::config_api(&args.connection)?;
    let group = match &args.file {
        Some(file) => group_from_file(file, &args.namespace)?,
        None => {
            let name = args.name.as_deref().unwrap_or_default();
            ensure_namespace(&api, &args.namespace).await?;
            let what = format!("reading WorkloadGroup {}/{name}", args.namespace);
            let path = workload_group::KIND.path(Some(&args.namespace), Some(name));
            let Some(object) = api.find(&path, &what).await? else {
                bail!(
                    "WorkloadGroup {}/{name} not found on {}: create it first \
                     (vmesh workload group create --name {name} -n {} … | vmesh apply -f -)",
                    args.namespace,
                    api.server(),
                    args.namespace
                );
            };
            Group::from_object(&object)?
        }
    };
    if args.file.is_some() {
        ensure_namespace(&api, &group.namespace).await?;
    }
    let display = format!("WorkloadGroup {}/{}", group.namespace, group.name);

    let service_account = match (
        group.spec.template.service_account.as_deref(),
        args.service_account.as_deref(),
    ) {
        (Some(ours), Some(theirs)) if ours != theirs => {
            bail!("--serviceAccount {theirs} disagrees with {display}, whose workloads are {ours}")
        }
        (Some(sa), _) | (None, Some(sa)) => sa.to_string(),
        (None, None) => "default".to_string(),
    };

    let mesh = api.mesh_settings(args.revision.as_deref()).await?;
    if let Some(revision) = args.revision.as_deref()
        && istiod_host(Some(revision)) != istiod_host(None)
        && mesh.sources.is_empty()
    {
        let default = api.mesh_settings(None).await?;
        eprintln!(
            "{}",
            revision_fallback(revision, &mesh, &default, args.cluster_id.as_deref())
        );
    }
    let mut proxy_config = mesh.default_config.clone();
    let spec_annotations = group
        .spec
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    for annotations in [&group.annotations, &spec_annotations] {
        if let Some(text) = annotations.get(PROXY_CONFIG_ANNOTATION) {
            let overlay: Value = serde_saphyr::from_str(text).with_context(|| {
                format!("{display}: annotation {PROXY_CONFIG_ANNOTATION} is not YAML")
            })?;
            let Value::Object(overlay) = overlay else {
                bail!("{display}: annotation {PROXY_CONFIG_ANNOTATION} is not a ProxyConfig map");
            };
            merge(&mut proxy_config, overlay);
        }
    }

    let mut labels = group
        .spec
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    if let Some(template_labels) = &group.spec.template.labels {
        eprintln!(
            "warning: {display}: labels belong in spec.metadata; the template's override them: {template_labels:?}"
        );
        labels.extend(template_labels.clone());
    }

    let template_network = group.spec.template.network.clone().unwrap_or_default();
    let network = match &args.network {
        Some(network) => {
            if !template_network.is_empty() && *network != template_network {
                eprintln!(
                    "warning: --network {network} differs from {display}'s network {template_network}"
                );
            }
            network.clone()
        }
        None => template_network,
    };

    let trust_domain = args
        .trust_domain
        .clone()
        .unwrap_or_else(|| mesh.trust_domain.clone());
    let discovery_address = match &args.ingress_host {
        Some(host) => {
            let host = host.trim();
            if host.is_empty()
                || host.contains(|c: char| c.is_whitespace() || c == '\'' || c == '/')
            {
                bail!("--ingressHost {host:?} is not a host name");
            }
            with_port(host)
        }
        None => proxy_config
            .get("discoveryAddress")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| with_port(&istiod_host(args.revision.as_deref()))),
    };
    let dns_capture = args.capture_dns.unwrap_or_else(|| {
        proxy_config
            .get("proxyMetadata")
            .and_then(|m| m.get("ISTIO_META_DNS_CAPTURE"))
            .and_then(Value::as_str)
            .is_none_or(|v| v == "true")
    });
    let ingress = ingress_address(&api, &args).await?;
    let onboarding = Onboarding {
        group: group.name.clone(),
        namespace: group.namespace.clone(),
        service_account: service_account.clone(),
        labels,
        ports: group.spec.template.ports.clone().unwrap_or_default(),
        network,
        cluster_id: args
            .cluster_id
            .clone()
            .or(mesh.cluster_name.clone())
            .unwrap_or_else(|| DEFAULT_CLUSTER_ID.into()),
        mesh_id: mesh.mesh_id.clone().unwrap_or_else(|| trust_domain.clone()),
        trust_domain,
        discovery_address,
        autoregister: args.autoregister,
        dns_capture,
        probe: group
            .spec
            .probe
            .as_ref()
            .map(serde_json::to_value)
            .transpose()?,
        proxy_config,
        ingress_ip: ingress.ip,
        workload_ip: match (args.internal_ip, args.external_ip) {
            (Some(ip), _) => Some(WorkloadIp::Internal(ip)),
            (None, Some(ip)) => Some(WorkloadIp::External(ip)),
            (None, None) => None,
        },
    };
    let discovery_host = files::host_of(&onboarding.discovery_address).to_string();
    if onboarding.ingress_ip.is_some() && onboarding.hosts().is_empty() {
        eprintln!(
            "warning: the discovery address {} is an IP: --ingressIP adds nothing to hosts",
            onboarding.discovery_address
        );
    } else if onboarding.hosts().is_empty()
        && args.ingress_host.is_none()
        && discovery_host.parse::<IpAddr>().is_err()
    {
        // istioctl warns too ("Could not auto-detect IP for …") and writes the empty file.
        eprintln!(
            "WARNING: {} is empty: nothing maps {discovery_host} to an address, so the VM \
             cannot find the control plane (unless its own DNS resolves that name).\n\
             WARNING: {}.\n\
             WARNING: give --ingressIP with the server's (or gateway's) IP, --ingressHost with \
             a name the VM resolves, or --ingressService with a Service that has an external IP.",
            files::HOSTS.name,
            ingress
                .why_none
                .as_deref()
                .unwrap_or("no address was given")
        );
    }

    // Everything from the server before anything is written, so a failure
    // leaves the directory as it was.
    warn_missing_service_account(&api, &group.namespace, &service_account).await;
    let root_cert = root_cert(&api, &group.namespace).await?;
    let mut bundle: Vec<(BundleFile, String)> = vec![
        (files::CLUSTER_ENV, onboarding.cluster_env()),
        (files::MESH_YAML, onboarding.mesh_yaml()?),
        (files::ROOT_CERT, root_cert),
        (files::HOSTS, onboarding.hosts()),
        (
            files::AGENT_UNIT,
            files::agent_unit(onboarding.hold_application()),
        ),
        (files::INSTALL_SH, files::install_sh()),
    ];
    let Some(output) = &args.output else {
        return create_join(&api, &args, &display, &onboarding, bundle).await;
    };
    let (token, expires) = issue_token(
        &api,
        &group.namespace,
        &service_account,
        args.token_duration,
    )
    .await?;
    bundle.push((files::TOKEN, token));
    files::write_bundle(output, &bundle)?;

    let dir = output.display().to_string();
    let dir = dir.trim_end_matches('/');
    println!("{display}: onboarding files written to {dir}/");
    for file in files::BUNDLE {
        println!(
            "  {:<20} {:04o}  {}",
            file.name,
            file.mode,
            vmesh_agent::onboarding_files::placement(file)
        );
    }
    println!(
        "identity {}/{service_account}, token valid until {expires}{}",
        group.namespace,
        if args.autoregister {
            "; the VM registers itself when it connects"
        } else {
            ""
        }
    );
    println!(
        "copy {dir} to the VM and run there: sudo sh {}",
        files::INSTALL_SH.name
    );
    if onboarding.hold_application() {
        println!(
            "holdApplicationUntilProxyStarts: the agent's unit ({}) counts as started once \
             its sidecar is ready; order your application after it: sudo APP_UNIT=<app>.service sh {}",
            files::ISTIO_UNIT,
            files::INSTALL_SH.name
        );
    }
    if let Some(host) = &args.ingress_host {
        println!(
            "the VM dials {}: the server's xDS certificate must name {} (vmesh server --xds-san {})",
            onboarding.discovery_address,
            files::host_of(&onboarding.discovery_address),
            files::host_of(host.trim())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// istioctl's default `--ingressService`.
const DEFAULT_INGRESS_SERVICE: &str = "istio-eastwestgateway";

/// The address `hosts` maps the control plane's name to, and why there is
/// none when there is none.
struct Ingress {
    ip: Option<IpAddr>,
    why_none: Option<String>,
}

/// `--ingressIP`, else (unless `--ingressHost` names the server) the
/// address of `--ingressService`, as istioctl finds it: the Service's load
/// balancer IP, else its first `externalIPs` entry.
async fn ingress_address(api: &Client, args: &ConfigureArgs) -> Result<Ingress> {
    let none = |why: String| Ingress {
        ip: None,
        why_none: Some(why),
    };
    if let Some(text) = args.ingress_ip.as_deref().map(str::trim)
        && !text.is_empty()
    {
        let ip = text.parse().with_context(|| {
            format!("--ingressIP {text:?} is not an IP address (a host name goes in --ingressHost)")
        })?;
        return Ok(Ingress {
            ip: Some(ip),
            why_none: None,
        });
    }
    if args.ingress_host.is_some() {
        return Ok(none("--ingressHost names the server".into()));
    }
    let given = args.ingress_service.as_deref();
    let service = given.unwrap_or(DEFAULT_INGRESS_SERVICE);
    // istioctl: `name.namespace`, or a name alone in the control plane's namespace.
    let (name, namespace) = match service.split('.').collect::<Vec<_>>().as_slice() {
        [name, namespace] => (*name, *namespace),
        _ => (service, vmesh_api::mesh::DEFAULT_ROOT_NAMESPACE),
    };
    let flag = if given.is_some() {
        "--ingressService"
    } else {
        "--ingressService's default"
    };
    let what = format!("reading Service {namespace}/{name}");
    let path = vmesh_api::kinds::service::KIND.path(Some(namespace), Some(name));
    let Some(object) = api.find(&path, &what).await? else {
        return Ok(none(format!(
            "Service {namespace}/{name} ({flag}) does not exist, and no --ingressIP was given"
        )));
    };
    let address = object["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .or(object["spec"]["externalIPs"][0].as_str())
        .and_then(|a| a.parse::<IpAddr>().ok());
    Ok(match address {
        Some(ip) => {
            eprintln!("hosts: the address of Service {namespace}/{name} ({flag}): {ip}");
            Ingress {
                ip: Some(ip),
                why_none: None,
            }
        }
        None => none(format!(
            "Service {namespace}/{name} ({flag}) has no load balancer address and no externalIPs"
        )),
    })
}

/// What `--revision` without an IstioOperator of that revision leaves:
/// the defaults, named, and the default revision's settings that are not used.
fn revision_fallback(
    revision: &str,
    used: &MeshSettings,
    default_revision: &MeshSettings,
    cluster_id_flag: Option<&str>,
) -> String {
    let cluster_id = cluster_id_flag.map_or_else(
        || format!("{DEFAULT_CLUSTER_ID} (give --clusterID)"),
        |id| format!("{id} (--clusterID)"),
    );
    let mesh_id = used.mesh_id.clone().unwrap_or(used.trust_domain.clone());
    let mut message = format!(
        "WARNING: no IstioOperator has revision {revision:?} (spec.revision): its mesh settings \
         are the defaults: trust domain {}, cluster ID {cluster_id}, mesh ID {mesh_id}, and no \
         meshConfig.defaultConfig (no proxyMetadata such as ISTIO_META_DNS_AUTO_ALLOCATE, no \
         holdApplicationUntilProxyStarts).",
        used.trust_domain
    );
    if !default_revision.sources.is_empty() {
        let mut unused: Vec<String> = Vec::new();
        if let Some(name) = &default_revision.cluster_name {
            unused.push(format!("cluster ID {name}"));
        }
        if let Some(id) = &default_revision.mesh_id {
            unused.push(format!("mesh ID {id}"));
        }
        if default_revision.trust_domain_set {
            unused.push(format!("trust domain {}", default_revision.trust_domain));
        }
        let keys: Vec<&str> = default_revision
            .default_config
            .keys()
            .map(String::as_str)
            .collect();
        if !keys.is_empty() {
            unused.push(format!("meshConfig.defaultConfig {}", keys.join(", ")));
        }
        message.push_str(&format!(
            "\nWARNING: the default revision's IstioOperator {} is not used{}.",
            default_revision.sources.join(", "),
            if unused.is_empty() {
                String::new()
            } else {
                format!(" ({})", unused.join("; "))
            }
        ));
    }
    message.push_str(&format!(
        "\nWARNING: apply an IstioOperator with spec.revision: {revision}, or leave --revision out."
    ));
    message
}

/// Registers the files under a new join token and prints the join line.
async fn create_join(
    api: &Client,
    args: &ConfigureArgs,
    display: &str,
    onboarding: &Onboarding,
    bundle: Vec<(BundleFile, String)>,
) -> Result<ExitCode> {
    let files: Map<String, Value> = bundle
        .into_iter()
        .map(|(file, contents)| (file.name.to_string(), Value::String(contents)))
        .collect();
    let what = format!("creating a join token for {display}");
    let created = api
        .post(
            &format!(
                "/apis/vmesh.io/v1/namespaces/{}/workloadgroups/{}/jointokens",
                onboarding.namespace, onboarding.group
            ),
            &json!({
                "uses": args.join_uses,
                "durationSeconds": args.join_duration.as_secs(),
                "tokenDurationSeconds": args.token_duration.as_secs(),
                "files": files,
            }),
            &what,
        )
        .await?;
    let field = |key: &str| {
        created[key]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("{what}: the server's answer has no {key}"))
    };
    let (token, ca_hash) = (field("token")?, field("caHash")?);
    println!(
        "join token {} for {display}: {} use{}, valid until {}",
        field("id")?,
        args.join_uses,
        if args.join_uses == 1 { "" } else { "s" },
        field("expires")?
    );
    println!("on the VM, as root (the vmesh binary installed):");
    println!(
        "  vmesh agent join --server {} --token {token} --ca-hash {ca_hash}",
        onboarding.discovery_address
    );
    Ok(ExitCode::SUCCESS)
}

async fn revoke_join(args: JoinRevokeArgs) -> Result<ExitCode> {
    let api = Client::config_api(&args.connection)?;
    let what = format!(
        "revoking join tokens of WorkloadGroup {}/{}",
        args.namespace, args.name
    );
    let body = match &args.id {
        Some(id) => json!({"id": id}),
        None => json!({}),
    };
    let answer = api
        .post(
            &format!(
                "/apis/vmesh.io/v1/namespaces/{}/workloadgroups/{}/jointokens/revoke",
                args.namespace, args.name
            ),
            &body,
            &what,
        )
        .await?;
    println!(
        "{} join token(s) of WorkloadGroup {}/{} revoked: new joins with them are refused",
        answer["revoked"], args.namespace, args.name
    );
    Ok(ExitCode::SUCCESS)
}

async fn ensure_namespace(api: &Client, namespace: &str) -> Result<()> {
    let what = format!("reading namespace {namespace}");
    if api
        .find(&format!("/api/v1/namespaces/{namespace}"), &what)
        .await?
        .is_none()
    {
        bail!(
            "namespace {namespace} does not exist on {} (vmesh create namespace {namespace})",
            api.server()
        );
    }
    Ok(())
}

async fn warn_missing_service_account(api: &Client, namespace: &str, account: &str) {
    let path = format!("/api/v1/namespaces/{namespace}/serviceaccounts/{account}");
    if let Ok(None) = api.find(&path, "reading the service account").await {
        eprintln!(
            "warning: ServiceAccount {namespace}/{account} does not exist; the token is issued for it anyway"
        );
    }
}

/// `root-cert.pem` of the namespace's `istio-ca-root-cert`, waiting a little
/// for a namespace the server has not published the root to yet.
async fn root_cert(api: &Client, namespace: &str) -> Result<String> {
    let what = format!("reading ConfigMap {namespace}/{ROOT_CONFIG_MAP}");
    let path = format!("/api/v1/namespaces/{namespace}/configmaps/{ROOT_CONFIG_MAP}");
    let deadline = tokio::time::Instant::now() + ROOT_CERT_WAIT;
    loop {
        if let Some(map) = api.find(&path, &what).await? {
            let pem = map["data"][ROOT_CERT_KEY].as_str().unwrap_or_default();
            if !pem.contains("BEGIN CERTIFICATE") {
                bail!(
                    "ConfigMap {namespace}/{ROOT_CONFIG_MAP} holds no certificate under {ROOT_CERT_KEY}"
                );
            }
            return Ok(pem.to_string());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "ConfigMap {namespace}/{ROOT_CONFIG_MAP} not found on {}: \
                 the server publishes the mesh root to every namespace; is it running its CA?",
                api.server()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A bootstrap token (audience istio-ca) and when it expires.
async fn issue_token(
    api: &Client,
    namespace: &str,
    account: &str,
    life: Duration,
) -> Result<(String, String)> {
    let what = format!("issuing a token for ServiceAccount {namespace}/{account}");
    let issued = api
        .post(
            &format!("/apis/vmesh.io/v1/namespaces/{namespace}/serviceaccounts/{account}/token"),
            &json!({"durationSeconds": life.as_secs()}),
            &what,
        )
        .await?;
    let token = issued["token"]
        .as_str()
        .filter(|t| t.split('.').count() == 3)
        .with_context(|| format!("{what}: the server's answer carries no token"))?;
    let expires = issued["expires"].as_str().unwrap_or("?").to_string();
    Ok((token.to_string(), expires))
}
