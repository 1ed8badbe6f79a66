//! A real etcd cluster (Debian's `etcd-server`) on loopback, this machine's
//! or a network namespace's, for the store's etcd backend and the servers
//! that share it: members on free ports, data in a directory of the
//! caller's, each member bound to the test's life (`setpriv --pdeathsig
//! KILL`) and stopped when the cluster is dropped. Members can be killed
//! and started again to take quorum away and give it back.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::process::{self, GRACE};

/// One member's addresses and process.
struct Member {
    name: String,
    client: String,
    peer: String,
    /// Plaintext `/health` and `/metrics`.
    metrics: String,
    child: Option<Child>,
}

/// Client TLS for the members: their serving certificate and key (for
/// 127.0.0.1), and the CA whose client certificates they require.
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// An etcd cluster of one or more members on 127.0.0.1.
pub struct EtcdCluster {
    dir: PathBuf,
    /// Client TLS, when the members take only TLS clients with certificates.
    tls: Option<EtcdServerTls>,
    /// The network namespace the members run in; this machine's own if none.
    namespace: Option<String>,
    members: Vec<Member>,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdCluster {
    /// Starts `size` members with their data under `dir` and waits until
    /// the cluster answers. Transactions may hold 10,000 operations and
    /// 32 MiB, so that a large `vmesh apply` fits in one (etcd's defaults
    /// are 128 and 1.5 MiB; vmesh's README says to raise them).
    pub fn start(size: usize, dir: &Path) -> Result<EtcdCluster> {
        Self::start_in(None, size, dir)
    }

    /// [`EtcdCluster::start`] inside the network namespace `namespace`,
    /// for servers that run there.
    pub fn start_in(namespace: Option<&str>, size: usize, dir: &Path) -> Result<EtcdCluster> {
        Self::start_with(namespace, size, dir, None)
    }

    /// [`EtcdCluster::start_in`] with client TLS: the members serve
    /// `https://` only and require a client certificate from `tls.client_ca`.
    pub fn start_with(
        namespace: Option<&str>,
        size: usize,
        dir: &Path,
        tls: Option<EtcdServerTls>,
    ) -> Result<EtcdCluster> {
        // Free ports are found before etcd binds them: a cluster another
        // test starts at the same moment can take one first. Such a start
        // is made again, on other ports.
        let mut attempt = 1;
        loop {
            match Self::start_once(namespace, size, dir, tls.clone()) {
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    attempt += 1;
                    std::fs::remove_dir_all(dir)?;
                }
                started => return started,
            }
        }
    }

    fn start_once(
        namespace: Option<&str>,
        size: usize,
        dir: &Path,
        tls: Option<EtcdServerTls>,
    ) -> Result<EtcdCluster> {
        std::fs::create_dir_all(dir)?;
        let mut members = Vec::new();
        for index in 0..size {
            members.push(Member {
                name: format!("m{index}"),
                client: format!("127.0.0.1:{}", free_port()?),
                peer: format!("127.0.0.1:{}", free_port()?),
                metrics: format!("127.0.0.1:{}", free_port()?),
                child: None,
            });
        }
        let mut cluster = EtcdCluster {
            dir: dir.to_path_buf(),
            tls,
            namespace: namespace.map(str::to_string),
            members,
        };
        for index in 0..size {
            cluster.spawn(index)?;
        }
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    fn spawn(&mut self, index: usize) -> Result<()> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect();
        let member = &self.members[index];
        let data = self.dir.join(&member.name);
        let log = std::fs::File::create(self.dir.join(format!("{}.log", member.name)))?;
        let client_url = format!("{}://{}", self.scheme(), member.client);
        let peer_url = format!("http://{}", member.peer);
        let mut command = self.command(&["setpriv", "--pdeathsig", "KILL", "--", "etcd"]);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.client_ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args([
                "--listen-metrics-urls",
                &format!("http://{}", member.metrics),
            ])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "vmesh-test"])
            .args(["--max-txn-ops", "10000"])
            .args(["--max-request-bytes", "33554432"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd (Debian package etcd-server: scripts/install-deps.sh)")?;
        self.members[index].child = Some(child);
        Ok(())
    }

    /// `host:port` of every member, comma-separated, as `--store etcd://`
    /// takes them.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `--store` URL of this cluster with a key prefix (with TLS, the
    /// server also needs `--etcd-ca` and a client certificate).
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.endpoints())
    }

    /// Whether every running member says it is healthy (it has a leader
    /// and a quorum).
    pub fn healthy(&self) -> bool {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .all(|m| self.member_healthy(&m.metrics))
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// `args` to run where the members run.
    fn command(&self, args: &[&str]) -> Command {
        match &self.namespace {
            Some(namespace) => crate::netns::command_in(namespace, args),
            None => {
                let mut command = Command::new(args[0]);
                command.args(&args[1..]);
                command
            }
        }
    }

    /// etcd's `/health` on a member's plaintext metrics port (its client
    /// port may want TLS and a certificate), asked with curl from where the
    /// member runs.
    fn member_healthy(&self, metrics: &str) -> bool {
        let url = format!("http://{metrics}/health");
        self.command(&["curl", "-s", "--max-time", "2", &url])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("\"health\":\"true\""))
    }

    fn wait_healthy(&mut self, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.healthy() {
            for member in &mut self.members {
                if let Some(child) = &mut member.child
                    && let Some(status) = child.try_wait()?
                {
                    bail!(
                        "etcd member {} exited ({status}); its log: {}",
                        member.name,
                        std::fs::read_to_string(self.dir.join(format!("{}.log", member.name)))
                            .unwrap_or_default()
                    );
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("etcd at {} not healthy within {limit:?}", self.endpoints());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Kills member `index` (SIGKILL: a machine lost).
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `index` again on its data and waits until the cluster
    /// is healthy.
    pub fn restart(&mut self, index: usize) -> Result<()> {
        if self.members[index].child.is_none() {
            self.spawn(index)?;
        }
        self.wait_healthy(Duration::from_secs(30))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        let mut children: Vec<Child> = self
            .members
            .iter_mut()
            .filter_map(|m| m.child.take())
            .collect();
        process::terminate(&mut children, &[], GRACE);
    }
}
