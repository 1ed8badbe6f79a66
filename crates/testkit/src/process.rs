//! Processes by pid: whether one runs, signals, and the one way every
//! process this crate started or found is stopped: SIGTERM, a grace period,
//! then SIGKILL, and never returning while one is left (children reaped).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use tokio::time::Instant;

/// How long a process gets between SIGTERM and SIGKILL when it is cleaned
/// up (an agent asked to stop drains for 2 s; a test does not wait for it).
pub const GRACE: Duration = Duration::from_secs(1);

/// How long a SIGKILLed process may take to be gone before giving up.
const KILL_LIMIT: Duration = Duration::from_secs(5);

/// Whether `pid` runs (a zombie, exited but not reaped, does not).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Sends `signal` (`TERM`, `KILL`, …) to `pid`; a process already gone is
/// not an error.
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Stops `children` (ours, so they are reaped) and `others` (pids found,
/// for example, inside a namespace): SIGTERM to all at once, up to `grace`
/// for them to exit, then SIGKILL to what is left. Returns once none runs.
pub fn terminate(children: &mut [Child], others: &[u32], grace: Duration) {
    let mut pids: Vec<u32> = Vec::new();
    for child in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            pids.push(child.id());
        }
    }
    for pid in others {
        if !pids.contains(pid) {
            pids.push(*pid);
        }
    }
    for pid in &pids {
        signal(*pid, "TERM");
    }
    let running = |pids: &[u32]| {
        pids.iter()
            .copied()
            .filter(|p| alive(*p))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + grace;
    let mut left = running(&pids);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left = running(&left);
    }
    for pid in &left {
        signal(*pid, "KILL");
    }
    for child in children.iter_mut() {
        let _ = child.wait();
    }
    let deadline = Instant::now() + KILL_LIMIT;
    while !running(&left).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops one child: SIGTERM, up to `limit` for it to exit on its own (an
/// agent drains first), else SIGKILL and an error saying so.
pub fn stop(child: &mut Child, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    signal(child.id(), "TERM");
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    anyhow::bail!(
        "process {} did not stop within {limit:?} of SIGTERM; killed",
        child.id()
    )
}

/// User and system CPU seconds of `/proc/<process>` (a pid or `self`).
pub fn cpu_seconds(process: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{process}/stat"))?;
    // Fields after the command name (which may hold spaces): state is 3rd;
    // utime and stime are the 14th and 15th.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("CPU times of process {process}"))
    };
    // USER_HZ is 100 on Linux.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}
