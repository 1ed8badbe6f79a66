//! Processes the agent starts, bound to its life: each is started through
//! util-linux's `setpriv --pdeathsig KILL`, which asks the kernel to kill it
//! when the agent goes (Istio's agent sets the same parent-death signal on
//! its Envoy). That holds however the agent ends — SIGKILL, the OOM killer,
//! a panic that aborts — where `kill_on_drop` only helps when the agent
//! unwinds. A pid file lets a new agent find and stop what an earlier one of
//! the same work directory left behind, checked against the process's
//! command line so that nothing else is ever signalled.
//!
//! This module owns starting, signalling and finding those processes. It
//! does not decide when to start or stop them ([`crate::envoy`] and
//! [`crate::health`] do).
//!
//! Older kernels send the signal when the *thread* that started the child
//! exits, newer ones when its process does. Children are started from the
//! runtime's worker threads, which live as long as the agent (the agent
//! never uses `block_in_place`, which would retire one), so both mean: when
//! the agent dies.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::process::Command;

/// Where util-linux's `setpriv` is looked for.
const SETPRIV_PATHS: &[&str] = &["/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv"];

fn setpriv() -> Option<&'static Path> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let found = SETPRIV_PATHS
                .iter()
                .map(PathBuf::from)
                .find(|path| path.is_file());
            if found.is_none() {
                tracing::warn!(
                    "setpriv (util-linux) not found: children of the agent will outlive it if it is killed"
                );
            }
            found
        })
        .as_deref()
}

/// A command for `program` whose process is killed when the agent dies.
pub fn bound_to_agent(program: impl AsRef<Path>) -> Command {
    let program = program.as_ref();
    match setpriv() {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "KILL", "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Whether process `pid` runs with `arg` among its arguments (and is not a
/// zombie).
fn runs_with(pid: i32, arg: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let arg = arg.as_os_str().as_encoded_bytes();
    !cmdline.is_empty() && cmdline.split(|b| *b == 0).any(|a| a == arg)
}

/// Remembers `pid` in `pid_file` as the process an agent of this work
/// directory runs.
pub fn remember(pid_file: &Path, pid: u32) {
    if let Err(e) = std::fs::write(pid_file, format!("{pid}\n")) {
        tracing::warn!("writing {}: {e}", pid_file.display());
    }
}

/// Forgets the process `pid_file` names (it was stopped).
pub fn forget(pid_file: &Path) {
    let _ = std::fs::remove_file(pid_file);
}

/// Stops the process `pid_file` names if it still runs with `arg` among its
/// arguments (a process an earlier agent left running): SIGTERM, then
/// SIGKILL after `grace`. Returns the pid it stopped.
pub fn stop_left_behind(pid_file: &Path, arg: &Path, grace: Duration) -> Option<i32> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    forget(pid_file);
    let pid: i32 = text.trim().parse().ok()?;
    if !runs_with(pid, arg) {
        return None;
    }
    tracing::warn!(
        pid,
        "stopping a process an earlier agent left running with {}",
        arg.display()
    );
    let target = Pid::from_raw(pid)?;
    let _ = rustix::process::kill_process(target, Signal::TERM);
    const POLL: Duration = Duration::from_millis(10);
    let mut waited = Duration::ZERO;
    while runs_with(pid, arg) && waited < grace {
        std::thread::sleep(POLL);
        waited += POLL;
    }
    if runs_with(pid, arg) {
        let _ = rustix::process::kill_process(target, Signal::KILL);
        let mut waited = Duration::ZERO;
        while runs_with(pid, arg) && waited < Duration::from_secs(2) {
            std::thread::sleep(POLL);
            waited += POLL;
        }
    }
    Some(pid)
}

/// Asks `pid` to stop (SIGTERM).
pub fn terminate(pid: u32) {
    if let Some(target) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(target, Signal::TERM);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_process_with_the_remembered_argument_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("envoy.pid");
        let mine = dir.path().join("envoy-rev.json");
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // The pid file names a process whose arguments are not ours: untouched.
        remember(&pid_file, sleeper.id());
        assert_eq!(
            stop_left_behind(&pid_file, &mine, Duration::from_secs(1)),
            None
        );
        assert!(
            sleeper.try_wait().unwrap().is_none(),
            "a stranger was signalled"
        );
        assert!(!pid_file.exists());
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();

        // One started with our bootstrap among its arguments is stopped.
        let mut left = std::process::Command::new("sh")
            .args(["-c", "trap '' TERM; sleep 30 & wait", "sh"])
            .arg(&mine)
            .spawn()
            .unwrap();
        let pid = i32::try_from(left.id()).unwrap();
        // Until the shell has been executed, the pid shows the test's
        // arguments; until it has started `sleep`, its trap may not be set.
        let has_child = || {
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .is_ok_and(|children| !children.trim().is_empty())
        };
        while !runs_with(pid, &mine) || !has_child() {
            std::thread::sleep(Duration::from_millis(5));
        }
        remember(&pid_file, left.id());
        let started = std::time::SystemTime::now();
        let stopped = stop_left_behind(&pid_file, &mine, Duration::from_millis(300));
        assert_eq!(stopped, Some(pid));
        // It ignored SIGTERM, so SIGKILL ended it after the grace period.
        assert!(started.elapsed().unwrap() >= Duration::from_millis(300));
        assert!(left.wait().unwrap().code().is_none());
    }
}
