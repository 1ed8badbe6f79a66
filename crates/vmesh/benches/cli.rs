//! Foundation benchmarks, measured on the real binary in one run:
//! `vmesh apply` of 1,000 objects in one file (target < 2 s) and
//! `vmesh validate` of the guide's Kubernetes manifests (target < 50 ms).
//!
//! Run with `cargo bench -p vmesh --bench cli`.

// A benchmark measures wall-clock time of child processes, outside any runtime.
#![allow(clippy::disallowed_types)]

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vmesh_api::testing::{NOT_KUBERNETES, seed_dir};
use vmesh_testkit::LocalServer;

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time(args: &[&str], env: &[(&str, &str)]) -> Duration {
    let start = Instant::now();
    let output = Command::new(VMESH)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run vmesh");
    let elapsed = start.elapsed();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    elapsed
}

fn report(name: &str, measured: Duration, target: Duration) {
    println!(
        "{name:<44} {:>9.1} ms   target {:>7.1} ms   ratio {:.3}",
        measured.as_secs_f64() * 1e3,
        target.as_secs_f64() * 1e3,
        measured.as_secs_f64() / target.as_secs_f64()
    );
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = LocalServer::start(Path::new(VMESH), &dir.path().join("data"), &[], &[])
        .expect("start server");
    let env = [("VMESH_SERVER", server.api())];

    let runs = 5;
    let manifests: Vec<String> = (0..runs)
        .map(|run| {
            let path = dir.path().join(format!("entries-{run}.yaml"));
            let mut file = std::fs::File::create(&path).expect("create");
            for i in 0..1000 {
                writeln!(
                    file,
                    "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: vm-{i}\n  namespace: default\n  labels: {{app: bench, run: r{run}}}\nspec:\n  address: 10.{}.{}.{}\n  ports: {{http: 8080}}\n  serviceAccount: bench-sa",
                    run, i / 256, i % 256
                )
                .expect("write");
            }
            path.display().to_string()
        })
        .collect();
    // Each run changes every object, so every run writes 1,000 objects.
    let apply: Vec<Duration> = manifests
        .iter()
        .map(|m| time(&["apply", "-f", m], &env))
        .collect();

    // The guide's Kubernetes manifests (its cloud-init and troubleshooting
    // files are not objects, and validate says so).
    let mut guide: Vec<String> = std::fs::read_dir(seed_dir())
        .expect("the guide's manifests")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| !NOT_KUBERNETES.iter().any(|n| p.ends_with(n)))
        .map(|p| p.display().to_string())
        .collect();
    guide.sort();
    let mut args = vec!["validate"];
    for file in &guide {
        args.extend(["-f", file.as_str()]);
    }
    let validate: Vec<Duration> = (0..20).map(|_| time(&args, &[])).collect();
    drop(server);

    println!("vmesh foundation benchmarks (median of runs, process start included)");
    report(
        "apply -f 1,000 WorkloadEntries (one file)",
        median(apply),
        Duration::from_secs(2),
    );
    report(
        "validate -f the guide's manifests",
        median(validate),
        Duration::from_millis(50),
    );
}
