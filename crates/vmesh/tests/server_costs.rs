//! What the real server spends on bulk work, read from its own CPU
//! accounting (`/proc/<pid>/stat`), so that a cost that grows with the
//! square of the mesh shows up as a failure.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use vmesh_testkit::LocalServer;

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

/// The process's user and system CPU time in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let per_second: f64 = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    ticks / per_second
}

/// Creates namespaces `names` one request at a time, as a script looping
/// over `kubectl create namespace` would, then waits until the server has
/// published the mesh root into the last one and its rebuilds have settled.
async fn create_namespaces(client: &reqwest::Client, api: &str, names: std::ops::Range<usize>) {
    let last = names.end - 1;
    for i in names {
        let response = client
            .post(format!("{api}/api/v1/namespaces"))
            .json(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns-{i}")}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 201, "ns-{i}");
    }
    let root = format!("{api}/api/v1/namespaces/ns-{last}/configmaps/istio-ca-root-cert");
    let published = || async {
        client
            .get(&root)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    };
    let mut tries = 0;
    while !published().await {
        tries += 1;
        assert!(tries < 200, "the root never reached ns-{last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn creating_two_thousand_namespaces_costs_little_and_grows_linearly() {
    let dir = tempfile::tempdir().unwrap();
    let server = LocalServer::start(Path::new(VMESH), dir.path(), &[], &[]).unwrap();
    let client = reqwest::Client::new();
    let api = server.api().to_string();
    let start = cpu_seconds(server.pid());
    create_namespaces(&client, &api, 0..1000).await;
    let half = cpu_seconds(server.pid());
    create_namespaces(&client, &api, 1000..2000).await;
    let end = cpu_seconds(server.pid());
    let (first, second) = (half - start, end - half);
    println!("server CPU: first 1,000 namespaces {first:.2} s, second 1,000 {second:.2} s");
    assert!(
        end - start < 5.0,
        "2,000 namespaces cost {:.2} CPU-seconds",
        end - start
    );
    // Linear: the second thousand costs about what the first did (with
    // room for the clock ticks' granularity), not three times as much.
    assert!(
        second < first * 2.0 + 0.3,
        "the second 1,000 namespaces cost {second:.2} s against {first:.2} s for the first"
    );
}

/// A server following a config dir does nothing while nothing changes: it
/// once read its own reads of the files as changes, and re-read the
/// directory five times a second forever.
#[test]
fn an_idle_server_following_a_config_dir_stays_idle() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    for i in 0..50 {
        std::fs::write(
            config.join(format!("entry-{i}.yaml")),
            format!(
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: vm-{i}, namespace: default}}\nspec: {{address: 10.0.0.{i}}}\n"
            ),
        )
        .unwrap();
    }
    let server = LocalServer::start(
        Path::new(VMESH),
        &dir.path().join("data"),
        &["--config-dir", config.to_str().unwrap()],
        &[],
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let before = cpu_seconds(server.pid());
    std::thread::sleep(Duration::from_secs(3));
    let spent = cpu_seconds(server.pid()) - before;
    println!("idle for 3 s with a config dir of 50 files: {spent:.2} CPU-seconds");
    assert!(
        spent < 0.1,
        "an idle server spent {spent:.2} CPU-seconds in 3 s"
    );
}
