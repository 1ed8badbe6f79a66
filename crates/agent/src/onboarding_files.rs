//! The onboarding files, in one place: what `vmesh workload entry configure`
//! writes for one VM, and what `vmesh agent` reads back on it.
//!
//! This module owns:
//! - their names and modes in the bundle (the directory `configure -o`
//!   writes, the archive `vmesh agent join` fetches): [`BUNDLE`];
//! - Istio's paths on the VM, relative to the root the agent is given
//!   (`--root`, `/` on a VM): [`CLUSTER_ENV_PATH`], [`MESH_CONFIG_PATH`],
//!   [`TOKEN_PATH`] (and [`KEPT_TOKEN_PATH`]), [`ROOT_CERT_PATH`],
//!   [`HOSTS_PATH`], [`AGENT_UNIT_PATH`] and the guide's name for it,
//!   [`ISTIO_UNIT_LINK_PATH`] — install.sh takes them from here
//!   ([`install_sh`]);
//! - the `cluster.env` keys the agent reads back ([`keys`]);
//! - their contents ([`render`]: `cluster.env`, `mesh.yaml`, `hosts`, and
//!   `install.sh` and `vmesh-agent.service` ([`agent_unit`]), which place
//!   and run them) and
//!   writing the bundle ([`write_bundle`]);
//! - reading them where they are installed ([`Installed`]: cluster.env's
//!   values, mesh.yaml's `readinessProbe`, the root certificate and token).
//!
//! It does not fetch what goes into them (the CLI reads the group, the mesh
//! settings, a token and the mesh root from the server), install them
//! (install.sh does), or decide what the agent makes of them
//! ([`crate::workload`]).

pub mod render;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vmesh_api::kinds::workload_group::ReadinessProbe;

pub use render::{
    DEFAULT_CLUSTER_ID, Onboarding, WorkloadIp, host_of, istiod_host, shell_quote, with_port,
};

/// `cluster.env`: the workload's identity, placement and capture settings.
pub const CLUSTER_ENV_PATH: &str = "var/lib/istio/envoy/cluster.env";
/// `mesh.yaml`: `{defaultConfig: ProxyConfig}`.
pub const MESH_CONFIG_PATH: &str = "etc/istio/config/mesh";
/// Istio's path of the bootstrap token: on tmpfs on most systems, so a link
/// to [`KEPT_TOKEN_PATH`].
pub const TOKEN_PATH: &str = "var/run/secrets/tokens/istio-token";
/// Where install.sh keeps the bootstrap token, across reboots.
pub const KEPT_TOKEN_PATH: &str = "var/lib/istio/tokens/istio-token";
/// The mesh root.
pub const ROOT_CERT_PATH: &str = "etc/certs/root-cert.pem";
/// The hosts file `hosts`'s lines are added to.
pub const HOSTS_PATH: &str = "etc/hosts";
/// The agent's systemd unit.
pub const AGENT_UNIT_PATH: &str = "etc/systemd/system/vmesh-agent.service";
/// The guide's name for the agent's unit (`systemctl start istio`,
/// `journalctl -u istio`): an alias of [`AGENT_UNIT_PATH`].
pub const ISTIO_UNIT: &str = "istio.service";
/// Where install.sh links [`ISTIO_UNIT`] to the agent's unit. Not in
/// /etc/systemd/system: systemctl refuses to `enable` a unit by a name
/// linked there ("linked unit file"), and follows links elsewhere in its
/// search path as aliases.
pub const ISTIO_UNIT_LINK_PATH: &str = "usr/local/lib/systemd/system/istio.service";
/// How long the agent's unit waits for its sidecar to be ready when the
/// mesh holds applications until the proxy starts (systemd's start timeout
/// is set a little longer).
pub const HOLD_APPLICATION_TIMEOUT_SECS: u64 = 120;

pub use vmesh_api::onboarding::{
    AGENT_UNIT, BUNDLE, BundleFile, CLUSTER_ENV, HOSTS, INSTALL_SH, MESH_YAML, ROOT_CERT, TOKEN,
};

/// Where a bundle file goes on the VM, for people.
pub fn placement(file: BundleFile) -> String {
    match file {
        CLUSTER_ENV => format!("/{CLUSTER_ENV_PATH}"),
        MESH_YAML => format!("/{MESH_CONFIG_PATH}"),
        TOKEN => format!(
            "/{TOKEN_PATH} (kept in /{}/)",
            parent(KEPT_TOKEN_PATH).display()
        ),
        ROOT_CERT => format!("/{ROOT_CERT_PATH}"),
        HOSTS => format!("added to /{HOSTS_PATH}"),
        AGENT_UNIT => format!("/{AGENT_UNIT_PATH} (also {ISTIO_UNIT})"),
        _ => format!("run on the VM: sudo sh {}", INSTALL_SH.name),
    }
}

fn parent(path: &str) -> &Path {
    Path::new(path).parent().unwrap_or(Path::new(""))
}

/// The `cluster.env` keys the agent reads (the writer, [`render`], sets
/// them and more; the capture settings' names are
/// [`crate::capture::config`]'s).
pub mod keys {
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
    pub const SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
    pub const TRUST_DOMAIN: &str = "TRUST_DOMAIN";
    /// The control plane's CA address, `host:port`.
    pub const CA_ADDR: &str = "CA_ADDR";
    /// The control plane's xDS address, `host:port`.
    pub const PILOT_ADDRESS: &str = "PILOT_ADDRESS";
    /// The workload's labels, a JSON object.
    pub const LABELS: &str = "ISTIO_METAJSON_LABELS";
    /// The workload's address (`configure --internalIP|--externalIP`): the
    /// proxy's IP, and so its WorkloadEntry's address.
    pub const SVC_IP: &str = "ISTIO_SVC_IP";
    pub use crate::capture::config::ENV_DNS_CAPTURE as DNS_CAPTURE;
}

/// Why onboarding files could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not YAML")]
    NotYaml {
        path: PathBuf,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error("{path}: defaultConfig.readinessProbe")]
    Probe {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("creating {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `install.sh`, with Istio's paths from this module.
pub fn install_sh() -> String {
    let paths = [
        ("CLUSTER_ENV", CLUSTER_ENV_PATH),
        ("MESH", MESH_CONFIG_PATH),
        ("TOKEN", KEPT_TOKEN_PATH),
        ("TOKEN_LINK", TOKEN_PATH),
        ("ROOT_CERT", ROOT_CERT_PATH),
        ("UNIT", AGENT_UNIT_PATH),
        ("UNIT_ALIAS", ISTIO_UNIT_LINK_PATH),
    ]
    .map(|(variable, path)| format!("{variable}=/{path}\n"))
    .concat();
    include_str!("onboarding_files/install.sh").replacen("@ISTIO_PATHS@\n", &paths, 1)
}

/// `vmesh-agent.service`, the systemd unit that runs `vmesh agent --root /
/// --capture`. With `hold_application` (the mesh's
/// `holdApplicationUntilProxyStarts`) the unit counts as started only once
/// the sidecar is ready (`ExecStartPost=vmesh agent wait`), so an
/// application's unit ordered after it starts after its sidecar, as
/// Istio's injector orders a pod's containers.
pub fn agent_unit(hold_application: bool) -> String {
    let hold = if hold_application {
        format!(
            "# holdApplicationUntilProxyStarts: started (and the units ordered After= it\n\
             # may start) only once the sidecar is ready on the status port.\n\
             ExecStartPost=/usr/local/bin/vmesh agent wait --timeout {HOLD_APPLICATION_TIMEOUT_SECS}s\n\
             TimeoutStartSec={}\n",
            HOLD_APPLICATION_TIMEOUT_SECS + 30
        )
    } else {
        String::new()
    };
    include_str!("onboarding_files/vmesh-agent.service")
        .replacen("@HOLD_APPLICATION@", &hold, 1)
        .replacen("@ISTIO_UNIT@", ISTIO_UNIT, 1)
}

/// Writes the bundle into `dir` (created if missing), each file with its
/// mode, atomically: a file is the old one or the new one, never half
/// written or with looser permissions.
pub fn write_bundle(dir: &Path, files: &[(BundleFile, String)]) -> Result<(), FilesError> {
    std::fs::create_dir_all(dir).map_err(|source| FilesError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    for (file, contents) in files {
        let path = dir.join(file.name);
        vmesh_ca::files::write_file(&path, contents.as_bytes(), file.mode)
            .map_err(|source| FilesError::Write { path, source })?;
    }
    Ok(())
}

/// `cluster.env`'s `KEY='value'` lines (a `'` inside written `'\''`, as
/// [`shell_quote`] writes it).
pub fn parse_cluster_env(text: &str) -> BTreeMap<String, String> {
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

/// The onboarding files as installed under one root.
#[derive(Debug, Clone)]
pub struct Installed {
    root: PathBuf,
}

impl Installed {
    /// The files under `root` (`/` on a VM).
    pub fn at(root: impl Into<PathBuf>) -> Installed {
        Installed { root: root.into() }
    }

    /// `cluster.env`'s values; an error when it cannot be read.
    pub fn cluster_env(&self) -> Result<BTreeMap<String, String>, FilesError> {
        let path = self.root.join(CLUSTER_ENV_PATH);
        let text =
            std::fs::read_to_string(&path).map_err(|source| FilesError::Read { path, source })?;
        Ok(parse_cluster_env(&text))
    }

    /// mesh.yaml's `defaultConfig.readinessProbe`, when there is a mesh.yaml
    /// and it has one.
    pub fn readiness_probe(&self) -> Result<Option<ReadinessProbe>, FilesError> {
        let path = self.root.join(MESH_CONFIG_PATH);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(FilesError::Read { path, source }),
        };
        let mesh: serde_json::Value =
            serde_saphyr::from_str(&text).map_err(|source| FilesError::NotYaml {
                path: path.clone(),
                source: Box::new(source),
            })?;
        mesh.get("defaultConfig")
            .and_then(|config| config.get("readinessProbe"))
            .map(|probe| serde_json::from_value(probe.clone()))
            .transpose()
            .map_err(|source| FilesError::Probe { path, source })
    }

    /// The mesh root.
    pub fn root_cert(&self) -> PathBuf {
        self.root.join(ROOT_CERT_PATH)
    }

    /// The bootstrap token, at Istio's path or where install.sh keeps it,
    /// when there is one.
    pub fn token(&self) -> Option<PathBuf> {
        [TOKEN_PATH, KEPT_TOKEN_PATH]
            .into_iter()
            .map(|path| self.root.join(path))
            .find(|path| path.is_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_sh_gets_every_path_from_here() {
        let script = install_sh();
        assert!(!script.contains("@ISTIO_PATHS@"));
        for line in [
            "CLUSTER_ENV=/var/lib/istio/envoy/cluster.env\n",
            "MESH=/etc/istio/config/mesh\n",
            "TOKEN=/var/lib/istio/tokens/istio-token\n",
            "TOKEN_LINK=/var/run/secrets/tokens/istio-token\n",
            "ROOT_CERT=/etc/certs/root-cert.pem\n",
            "UNIT=/etc/systemd/system/vmesh-agent.service\n",
            "UNIT_ALIAS=/usr/local/lib/systemd/system/istio.service\n",
        ] {
            assert!(script.contains(line), "{line} missing");
        }
        let checked = std::process::Command::new("sh")
            .arg("-n")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut sh| {
                use std::io::Write;
                sh.stdin.take().unwrap().write_all(script.as_bytes())?;
                sh.wait()
            })
            .unwrap();
        assert!(checked.success(), "install.sh is not valid sh");
    }

    #[test]
    fn placements_name_istios_paths() {
        let table: Vec<(&str, String)> = BUNDLE.iter().map(|f| (f.name, placement(*f))).collect();
        assert_eq!(
            table,
            [
                ("cluster.env", "/var/lib/istio/envoy/cluster.env".into()),
                ("mesh.yaml", "/etc/istio/config/mesh".into()),
                (
                    "istio-token",
                    "/var/run/secrets/tokens/istio-token (kept in /var/lib/istio/tokens/)".into()
                ),
                ("root-cert.pem", "/etc/certs/root-cert.pem".into()),
                ("hosts", "added to /etc/hosts".into()),
                (
                    "vmesh-agent.service",
                    "/etc/systemd/system/vmesh-agent.service (also istio.service)".into()
                ),
                ("install.sh", "run on the VM: sudo sh install.sh".into()),
            ]
        );
        assert_eq!(BundleFile::named("istio-token"), Some(TOKEN));
        assert_eq!(BundleFile::named("passwd"), None);
    }

    #[test]
    fn what_is_written_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut onboarding = render::tests::payment();
        onboarding.probe = Some(serde_json::json!({
            "periodSeconds": 5,
            "httpGet": {"path": "/health", "port": 8080},
        }));
        onboarding.labels.insert("owner".into(), "it's ours".into());
        let bundle = [
            (CLUSTER_ENV, onboarding.cluster_env()),
            (MESH_YAML, onboarding.mesh_yaml().unwrap()),
            (TOKEN, "a.b.c".to_string()),
        ];
        let files = dir.path().join("files");
        write_bundle(&files, &bundle).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |name: &str| {
            std::fs::metadata(files.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!((mode("cluster.env"), mode("istio-token")), (0o644, 0o600));

        // Installed as install.sh would, then read as the agent does.
        let root = dir.path().join("root");
        for (file, path) in [
            (CLUSTER_ENV, CLUSTER_ENV_PATH),
            (MESH_YAML, MESH_CONFIG_PATH),
            (TOKEN, KEPT_TOKEN_PATH),
        ] {
            let to = root.join(path);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(files.join(file.name), to).unwrap();
        }
        let installed = Installed::at(&root);
        let env = installed.cluster_env().unwrap();
        assert_eq!(env[keys::POD_NAMESPACE], "vm-workloads");
        assert_eq!(env[keys::SERVICE_ACCOUNT], "payment-service-sa");
        assert_eq!(env[keys::CA_ADDR], "istiod.istio-system.svc:15012");
        let labels: BTreeMap<String, String> = serde_json::from_str(&env[keys::LABELS]).unwrap();
        assert_eq!(labels["owner"], "it's ours");
        let probe = installed.readiness_probe().unwrap().unwrap();
        assert_eq!(probe.period_seconds, Some(5));
        assert_eq!(installed.token(), Some(root.join(KEPT_TOKEN_PATH)));
        assert_eq!(installed.root_cert(), root.join(ROOT_CERT_PATH));

        let empty = Installed::at(dir.path().join("nothing"));
        assert!(empty.readiness_probe().unwrap().is_none());
        assert!(empty.token().is_none());
        assert!(matches!(empty.cluster_env(), Err(FilesError::Read { .. })));
    }
}
