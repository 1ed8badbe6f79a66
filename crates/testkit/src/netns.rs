//! Network namespaces as hosts: a [`Namespace`] owns the processes started
//! in it and, when dropped, leaves nothing behind: its processes and any
//! other still inside (an Envoy an agent started, say) are stopped
//! (SIGTERM, then SIGKILL after [`GRACE`]), the namespace is deleted (its
//! links and iptables rules with it), and so is the `/etc/netns/<name>`
//! directory it wrote. [`remove`] does the same by name, for what an
//! earlier run left. [`link`] joins two namespaces with a veth pair.
//!
//! Everything needs root and `ip` (iproute2). Processes are started with
//! `ip netns exec` and util-linux's `setpriv --pdeathsig KILL`, which both
//! exec them: the pid of the child is the process's own, so daemons must
//! stay in the foreground (`dnsmasq -k`), and the kernel kills them if this
//! process dies without dropping the namespace (unless it is
//! [outliving](Namespace::outliving)).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use parking_lot::Mutex;

use crate::process::{self, GRACE};

/// How long [`Namespace::stop`] waits after SIGTERM before SIGKILL.
pub const STOP_LIMIT: Duration = Duration::from_secs(30);

/// A network namespace that lives as long as this value, with the
/// processes started in it.
pub struct Namespace {
    name: String,
    children: Mutex<Vec<Child>>,
    /// Whether `/etc/netns/<name>` is ours to remove.
    etc: Mutex<bool>,
    /// Start processes in a process group of their own, so that they
    /// outlive this process when it is interrupted or [kept](Self::keep).
    detached: bool,
    /// Start processes without the parent-death signal, so that they can
    /// outlive this process.
    outliving: bool,
    kept: bool,
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespace")
            .field("name", &self.name)
            .finish()
    }
}

impl Namespace {
    /// Creates `name` (after removing one of that name an earlier run
    /// left, with whatever runs in it), loopback up.
    pub fn create(name: &str) -> Result<Namespace> {
        remove_all(&[name.to_string()], false);
        let output = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .context("running ip (iproute2 is needed)")?;
        if !output.status.success() {
            bail!(
                "ip netns add {name} failed (this needs root): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let ns = Namespace {
            name: name.to_string(),
            children: Mutex::default(),
            etc: Mutex::new(false),
            detached: false,
            outliving: false,
            kept: false,
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Processes started from now on get a process group of their own (as
    /// `vmesh demo` wants, so that they can outlive it).
    pub fn detached(mut self) -> Namespace {
        self.detached = true;
        self
    }

    /// Processes started from now on may outlive this process: without
    /// it, [`spawn`](Self::spawn) has the kernel kill them when this
    /// process dies, however it dies (`setpriv --pdeathsig KILL`), so that
    /// a killed test run leaves nothing behind.
    pub fn outliving(mut self) -> Namespace {
        self.outliving = true;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `args` to run inside the namespace.
    pub fn command(&self, args: &[&str]) -> Command {
        command_in(&self.name, args)
    }

    /// Runs `args` inside to completion: its standard output, or an error
    /// with its standard error.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let output = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {args:?} in {}", self.name))?;
        if !output.status.success() {
            bail!(
                "{} in {}: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts `args` inside, standard output and error in `log`; returns
    /// its index for [`stop`](Self::stop) and [`pid`](Self::pid).
    pub fn spawn(&self, args: &[&str], log: &Path) -> Result<usize> {
        use std::os::unix::process::CommandExt;
        // In append mode: a child that reopens /dev/stdout (Envoy's access
        // log) writes at the end too, not over the process's own lines.
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(log)
            .and_then(|file| {
                drop(file);
                std::fs::OpenOptions::new().append(true).open(log)
            })
            .with_context(|| format!("creating {}", log.display()))?;
        let mut command = if self.outliving {
            self.command(args)
        } else {
            let mut bound = vec!["setpriv", "--pdeathsig", "KILL", "--"];
            bound.extend_from_slice(args);
            self.command(&bound)
        };
        command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        if self.detached {
            command.process_group(0);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {} in {}", args[0], self.name))?;
        Ok(self.adopt(child))
    }

    /// Takes `child`, started by the caller from [`command`](Self::command)
    /// (to read its output, say), into the processes this namespace stops;
    /// returns its index.
    pub fn adopt(&self, child: Child) -> usize {
        let mut children = self.children.lock();
        children.push(child);
        children.len() - 1
    }

    /// The pid of the `index`th process started with [`spawn`](Self::spawn).
    pub fn pid(&self, index: usize) -> u32 {
        self.children.lock()[index].id()
    }

    /// Asks the `index`th process to stop (SIGTERM) and waits for it to
    /// exit; after [`STOP_LIMIT`] it is killed and that is an error.
    pub fn stop(&self, index: usize) -> Result<ExitStatus> {
        process::stop(&mut self.children.lock()[index], STOP_LIMIT)
    }

    /// Stops every process inside, ours and any other, as dropping does,
    /// and keeps the namespace.
    pub fn stop_all(&self) {
        let mut children = self.children.lock();
        terminate_inside(std::slice::from_ref(&self.name), &mut children);
    }

    /// Writes `/etc/netns/<name>/resolv.conf`, which `ip netns exec` shows
    /// the processes inside as `/etc/resolv.conf`; the directory goes with
    /// the namespace.
    pub fn resolv_conf(&self, text: &str) -> Result<()> {
        let dir = etc_dir(&self.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        *self.etc.lock() = true;
        std::fs::write(dir.join("resolv.conf"), text)
            .with_context(|| format!("writing {}/resolv.conf", dir.display()))
    }

    /// Leaves the namespace and everything in it running after this value
    /// is gone ([`remove`] removes it later).
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        terminate_inside(std::slice::from_ref(&self.name), self.children.get_mut());
        delete(&self.name, *self.etc.get_mut());
    }
}

/// Links `a` and `b` with a veth pair, `va<tag>` in `a` with `a_ip`/24 and
/// `vb<tag>` in `b` with `b_ip`/24, both up. Interface names have at most
/// 15 bytes: keep `tag` short.
pub fn link(a: &Namespace, a_ip: &str, b: &Namespace, b_ip: &str, tag: &str) -> Result<()> {
    let (a_dev, b_dev) = (format!("va{tag}"), format!("vb{tag}"));
    a.exec(&[
        "ip", "link", "add", &a_dev, "type", "veth", "peer", "name", &b_dev,
    ])?;
    a.exec(&["ip", "link", "set", &b_dev, "netns", &b.name])?;
    a.exec(&["ip", "addr", "add", &format!("{a_ip}/24"), "dev", &a_dev])?;
    a.exec(&["ip", "link", "set", &a_dev, "up"])?;
    b.exec(&["ip", "addr", "add", &format!("{b_ip}/24"), "dev", &b_dev])?;
    b.exec(&["ip", "link", "set", &b_dev, "up"])?;
    Ok(())
}

/// `args` to run inside the namespace `name` (`ip netns exec`).
pub fn command_in(name: &str, args: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", name]).args(args);
    command
}

/// The namespaces whose names start with `prefix`.
pub fn list(prefix: &str) -> Result<Vec<String>> {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running ip (iproute2 is needed)")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect())
}

/// Removes the namespaces `names` as dropping a [`Namespace`] does, with
/// their `/etc/netns` directories, stopping everything inside all of them
/// at once first. A name that does not exist is no error.
pub fn remove(names: &[String]) {
    remove_all(names, true);
}

fn remove_all(names: &[String], etc: bool) {
    terminate_inside(names, &mut []);
    for name in names {
        delete(name, etc);
    }
}

/// The processes inside the namespace `name` (none when it does not exist).
pub fn pids(name: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Stops `children` and every process inside `names`; again while a
/// process started meanwhile (by one being stopped) is found inside.
fn terminate_inside(names: &[String], children: &mut [Child]) {
    let inside = |names: &[String]| names.iter().flat_map(|n| pids(n)).collect::<Vec<u32>>();
    process::terminate(children, &inside(names), GRACE);
    for _ in 0..3 {
        let left = inside(names);
        if left.is_empty() {
            break;
        }
        process::terminate(&mut [], &left, GRACE);
    }
}

fn etc_dir(name: &str) -> PathBuf {
    Path::new("/etc/netns").join(name)
}

fn delete(name: &str, etc: bool) {
    let _ = Command::new("ip")
        .args(["netns", "delete", name])
        .stderr(Stdio::null())
        .output();
    if etc {
        let _ = std::fs::remove_dir_all(etc_dir(name));
    }
}
