//! The real server under requests meant to exhaust its memory: its peak
//! resident memory (`VmHWM`) stays within [`BOUND`] of what it used idle,
//! every request gets a clear answer, and `/healthz` keeps answering fast
//! while a 100,000-object store is built and rebuilt.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use serde_json::{Value, json};
use vmesh_testkit::LocalServer;

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");
/// The documented bound: peak resident memory over the idle figure.
const BOUND: u64 = 300 << 20;
/// The longest `/healthz` may take while the store is loaded.
const HEALTHZ_STALL: Duration = Duration::from_millis(50);
/// One test at a time: each measures a server that should have the
/// machine's cores to itself.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`).
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// A watch that never reads what it is sent: the request, then silence.
fn idle_watch(api: &str, path: &str) -> TcpStream {
    let address = api.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
    stream
}

fn config_maps(from: usize, count: usize, value: &str) -> Value {
    let items: Vec<Value> = (from..from + count)
        .map(|i| {
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": format!("cm-{i}"), "namespace": "default"},
                   "data": {"value": value}})
        })
        .collect();
    json!({"items": items})
}

async fn get_list(client: &reqwest::Client, api: &str, path: &str) -> Value {
    client
        .get(format!("{api}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Asks `/healthz` every 10 ms on a thread of its own until told the
/// longest answer.
struct HealthzProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Duration>,
}

impl HealthzProbe {
    fn start(api: &str) -> HealthzProbe {
        let address = api.strip_prefix("http://").unwrap().to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let asked = Instant::now();
                let mut stream = TcpStream::connect(&address).unwrap();
                write!(
                    stream,
                    "GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut response = String::new();
                std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
                assert!(response.starts_with("HTTP/1.1 200"), "{response}");
                worst = worst.max(asked.elapsed());
                std::thread::sleep(Duration::from_millis(10));
            }
            worst
        });
        HealthzProbe { stop, thread }
    }

    fn worst(self) -> Duration {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

async fn apply(client: &reqwest::Client, api: &str, body: &Value) {
    let response = client
        .post(format!("{api}/apis/vmesh.io/v1/apply"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert!(
        status.is_success(),
        "{status}: {}",
        response.text().await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_leave_the_server_up_and_within_its_memory_bound() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // An alias bomb, for the config dir once the server runs.
    let config_dir = dir.path().join("config");
    std::fs::create_dir(&config_dir).unwrap();
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for level in b'b'..=b'j' {
        let previous = (level - 1) as char;
        let level = level as char;
        bomb.push_str(&format!(
            "{level}: &{level} [*{previous}, *{previous}, *{previous}, *{previous}, *{previous}, *{previous}, *{previous}, *{previous}, *{previous}, *{previous}]\n"
        ));
    }
    let server = LocalServer::start(
        Path::new(VMESH),
        &dir.path().join("data"),
        &["--config-dir", config_dir.to_str().unwrap()],
        &[],
    )
    .unwrap();
    let pid = server.pid();
    let api = server.api().to_string();
    let client = reqwest::Client::new();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = memory(pid, "VmRSS:");
    let within_bound = |what: &str| {
        let peak = memory(pid, "VmHWM:");
        println!(
            "{what}: peak {} MB over an idle {} MB",
            (peak.saturating_sub(idle)) >> 20,
            idle >> 20
        );
        assert!(
            peak < idle + BOUND,
            "{what}: the server peaked at {} MB, {} MB over its idle {} MB",
            peak >> 20,
            (peak - idle) >> 20,
            idle >> 20
        );
    };
    std::fs::write(config_dir.join("bomb.yaml"), &bomb).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    within_bound("an alias bomb dropped into --config-dir");

    // A 100 MB body: refused with 413 before it is read.
    let body = vec![b' '; 100 << 20];
    let response = client
        .post(format!("{api}/api/v1/namespaces/default/configmaps"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    if let Ok(response) = response {
        assert_eq!(response.status().as_u16(), 413);
    }
    within_bound("a 100 MB body");

    // 200 watchers that never read, through 30,000 writes.
    let revision = get_list(&client, &api, "/api/v1/namespaces/default/configmaps").await
        ["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let watch_path =
        format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={revision}");
    let watchers: Vec<TcpStream> = (0..200).map(|_| idle_watch(&api, &watch_path)).collect();
    for round in 0..300 {
        apply(
            &client,
            &api,
            &config_maps(0, 100, &format!("round {round} {}", "x".repeat(200))),
        )
        .await;
    }
    within_bound("200 watchers that never read, through 30,000 writes");
    // Those watchers fell behind the store's history: when one reads at
    // last, it is told to list again (410) and the watch ends.
    let mut reader = BufReader::new(watchers[0].try_clone().unwrap());
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut told = false;
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        if line.contains("\"ERROR\"") && line.contains("410") {
            told = true;
            break;
        }
        line.clear();
    }
    assert!(told, "a watcher behind the history gets a 410 ERROR event");
    drop(watchers);

    // A 100,000-object store, built while /healthz is asked every 10 ms.
    let healthz = HealthzProbe::start(&api);
    for batch in 0..100 {
        apply(&client, &api, &config_maps(batch * 1000, 1000, "v")).await;
    }
    let worst = healthz.worst();
    println!("/healthz took at most {worst:?} while 100,000 objects were written");
    within_bound("building a 100,000-object store");

    // 10 watchers without a resourceVersion that never read, and 8 lists
    // of everything at once.
    let listing_watchers: Vec<TcpStream> = (0..10)
        .map(|_| idle_watch(&api, "/api/v1/configmaps?watch=1"))
        .collect();
    let lists = (0..8).map(|_| {
        let (client, api) = (client.clone(), api.clone());
        tokio::spawn(async move {
            get_list(&client, &api, "/api/v1/configmaps").await["items"]
                .as_array()
                .unwrap()
                .len()
        })
    });
    for list in lists {
        assert!(list.await.unwrap() >= 100_000);
    }
    within_bound("10 listing watchers that never read and 8 lists of 100,000 objects");
    drop(listing_watchers);
    let response = client.get(format!("{api}/healthz")).send().await.unwrap();
    assert!(response.status().is_success(), "the server is still up");
    assert!(
        worst < HEALTHZ_STALL,
        "/healthz stalled for {worst:?} while the store was loaded"
    );
}

/// The mesh's own kinds are what every rebuild reads: 100,000
/// WorkloadEntries written in batches keep the rebuilds busy, and
/// `/healthz` still answers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_stays_fast_while_a_store_of_100k_workload_entries_is_rebuilt() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let server = LocalServer::start(Path::new(VMESH), dir.path(), &[], &[]).unwrap();
    let api = server.api().to_string();
    let client = reqwest::Client::new();
    let healthz = HealthzProbe::start(&api);
    for batch in 0..100 {
        let items: Vec<Value> = (0..1000)
            .map(|i| {
                json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                       "metadata": {"name": format!("vm-{batch}-{i}"), "namespace": "default",
                                    "labels": {"app": format!("svc{}", batch % 50)}},
                       "spec": {"address": format!("10.{}.{}.{}", batch / 250, batch % 250, i % 250)}})
            })
            .collect();
        apply(&client, &api, &json!({"items": items})).await;
    }
    // The last rebuilds run after the last write.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let worst = healthz.worst();
    println!(
        "/healthz took at most {worst:?} while 100,000 WorkloadEntries were written and rebuilt"
    );
    assert!(
        worst < HEALTHZ_STALL,
        "/healthz stalled for {worst:?} during the rebuilds"
    );
}
