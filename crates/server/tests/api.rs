//! The config API in-process: one server per test on port 0, spoken to over HTTP.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use vmesh_server::{Running, ServerConfig, start};

struct Server {
    running: Running,
    base: String,
    http: reqwest::Client,
    _dir: Option<tempfile::TempDir>,
}

async fn serve_in(
    dir: &std::path::Path,
    token: Option<&str>,
    config_dir: Option<std::path::PathBuf>,
) -> Server {
    let running = start(ServerConfig {
        api_addr: "127.0.0.1:0".parse().unwrap(),
        api_token: token.map(str::to_string),
        config_dir,
        ..ServerConfig::new(dir.to_path_buf())
    })
    .await
    .unwrap();
    let base = format!("http://{}", running.api_addr);
    Server {
        running,
        base,
        http: reqwest::Client::new(),
        _dir: None,
    }
}

async fn serve() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve_in(dir.path(), None, None).await;
    server._dir = Some(dir);
    server
}

impl Server {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let code = response.status().as_u16();
        (code, response.json().await.unwrap_or(Value::Null))
    }
}

fn entry(name: &str, address: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "WorkloadEntry",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "payments"}},
        "spec": {"address": address, "ports": {"http": 8080}}
    })
}

const ENTRIES: &str = "/apis/networking.istio.io/v1/namespaces/default/workloadentries";
/// An admin token long enough for the server to accept.
const TOKEN: &str = "s3cret-s3cret-s3cret";

#[tokio::test]
async fn create_get_list_replace_delete() {
    let server = serve().await;
    let (code, created) = server
        .call(
            reqwest::Method::POST,
            ENTRIES,
            Some(entry("vm1", "10.0.0.1")),
        )
        .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(
        created["apiVersion"], "networking.istio.io/v1",
        "presented in the path's version"
    );
    let rv = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    let (code, got) = server
        .call(reqwest::Method::GET, &format!("{ENTRIES}/vm1"), None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(got["spec"]["address"], "10.0.0.1");
    let (_, old_version) = server
        .call(
            reqwest::Method::GET,
            "/apis/networking.istio.io/v1alpha3/namespaces/default/workloadentries/vm1",
            None,
        )
        .await;
    assert_eq!(old_version["apiVersion"], "networking.istio.io/v1alpha3");

    let (code, again) = server
        .call(
            reqwest::Method::POST,
            ENTRIES,
            Some(entry("vm1", "10.0.0.1")),
        )
        .await;
    assert_eq!(
        (code, again["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );

    let mut update = entry("vm1", "10.0.0.2");
    update["metadata"]["resourceVersion"] = json!(rv);
    let (code, replaced) = server
        .call(
            reqwest::Method::PUT,
            &format!("{ENTRIES}/vm1"),
            Some(update),
        )
        .await;
    assert_eq!(code, 200, "{replaced}");
    assert_eq!(replaced["metadata"]["generation"], 2);

    let (code, list) = server.call(reqwest::Method::GET, ENTRIES, None).await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "WorkloadEntryList");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let (_, all) = server
        .call(
            reqwest::Method::GET,
            "/apis/networking.istio.io/v1/workloadentries",
            None,
        )
        .await;
    assert_eq!(
        all["items"].as_array().unwrap().len(),
        1,
        "list across namespaces"
    );

    let (code, _) = server
        .call(reqwest::Method::DELETE, &format!("{ENTRIES}/vm1"), None)
        .await;
    assert_eq!(code, 200);
    let (code, status) = server
        .call(reqwest::Method::GET, &format!("{ENTRIES}/vm1"), None)
        .await;
    assert_eq!(code, 404);
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "NotFound");
    assert_eq!(status["code"], 404);
    server.running.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_status_bodies() {
    let server = serve().await;
    let (code, status) = server
        .call(
            reqwest::Method::POST,
            ENTRIES,
            Some(json!({"nonsense": true})),
        )
        .await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(status["reason"], "Invalid");

    let mut bad = entry("vm1", "10.0.0.1");
    bad["spec"]["ports"]["http"] = json!(70000);
    let (code, status) = server.call(reqwest::Method::POST, ENTRIES, Some(bad)).await;
    assert_eq!(code, 422);
    assert_eq!(status["details"]["causes"][0]["field"], "spec.ports.http");
    assert!(
        status["message"].as_str().unwrap().contains("out of range"),
        "{status}"
    );

    // Bodies: JSON that is not an object, duplicate keys, and bodies that
    // do not say they are JSON.
    let post = |content_type: Option<&'static str>, body: &'static str| {
        let mut request = server
            .http
            .post(format!("{}{ENTRIES}", server.base))
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        async move {
            let response = request.send().await.unwrap();
            let code = response.status().as_u16();
            (code, response.json::<Value>().await.unwrap())
        }
    };
    for body in ["{not json", "null", "[]", "42"] {
        let (code, status) = post(Some("application/json"), body).await;
        assert_eq!(
            (code, status["reason"].as_str()),
            (400, Some("BadRequest")),
            "{body}"
        );
    }
    let (code, status) = post(
        Some("application/json; charset=utf-8"),
        r#"{"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "a", "name": "b"}, "spec": {"address": "10.0.0.9"}}"#,
    )
    .await;
    assert_eq!(code, 422, "{status}");
    let message = status["message"].as_str().unwrap();
    assert!(
        message.contains("duplicate key \"name\"") && message.contains("request body:1:"),
        "{message}"
    );
    for content_type in [None, Some("text/plain"), Some("application/yaml")] {
        let (code, status) = post(content_type, r#"{"apiVersion": "v1"}"#).await;
        assert_eq!(code, 415, "{content_type:?}: {status}");
        assert_eq!(status["reason"], "UnsupportedMediaType");
    }
    // Bytes that are not UTF-8 in a field the apply list ignores (found
    // by the api_request fuzz target: it panicked the handler).
    let response = server
        .http
        .post(format!("{}/apis/vmesh.io/v1/apply", server.base))
        .header("content-type", "application/json")
        .body(&b"{\"nd\": \"Config\xabv1\", \"items\": []}"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let status: Value = response.json().await.unwrap();
    assert!(
        status["message"].as_str().unwrap().contains("not UTF-8"),
        "{status}"
    );

    let (code, status) = server
        .call(
            reqwest::Method::GET,
            "/apis/networking.istio.io/v1/namespaces/default/gizmos",
            None,
        )
        .await;
    assert_eq!((code, status["reason"].as_str()), (404, Some("NotFound")));

    let mut elsewhere = entry("vm1", "10.0.0.1");
    elsewhere["metadata"]["namespace"] = json!("nowhere");
    let (code, status) = server
        .call(
            reqwest::Method::POST,
            "/apis/networking.istio.io/v1/namespaces/nowhere/workloadentries",
            Some(elsewhere),
        )
        .await;
    assert_eq!(
        code, 404,
        "objects in a missing namespace are refused: {status}"
    );
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("namespace \"nowhere\" not found")
    );

    let (code, _) = server
        .call(
            reqwest::Method::DELETE,
            "/api/v1/namespaces/istio-system",
            None,
        )
        .await;
    assert_eq!(code, 403);
    server.running.shutdown().await;
}

#[tokio::test]
async fn racing_writers_one_wins_the_other_conflicts() {
    let server = serve().await;
    let (_, created) = server
        .call(
            reqwest::Method::POST,
            ENTRIES,
            Some(entry("vm1", "10.0.0.1")),
        )
        .await;
    let rv = created["metadata"]["resourceVersion"].clone();
    let writes = (0..8).map(|i| {
        let mut update = entry("vm1", &format!("10.0.1.{i}"));
        update["metadata"]["resourceVersion"] = rv.clone();
        server.call(
            reqwest::Method::PUT,
            "/apis/networking.istio.io/v1/namespaces/default/workloadentries/vm1",
            Some(update),
        )
    });
    let results = futures::future::join_all(writes).await;
    let winners: Vec<&Value> = results
        .iter()
        .filter(|(c, _)| *c == 200)
        .map(|(_, v)| v)
        .collect();
    let conflicts = results
        .iter()
        .filter(|(c, v)| *c == 409 && v["reason"] == "Conflict")
        .count();
    assert_eq!((winners.len(), conflicts), (1, 7), "{results:?}");
    let (_, now) = server
        .call(reqwest::Method::GET, &format!("{ENTRIES}/vm1"), None)
        .await;
    assert_eq!(
        now["spec"]["address"], winners[0]["spec"]["address"],
        "the winner's write is what is stored"
    );
    server.running.shutdown().await;
}

#[tokio::test]
async fn watch_streams_every_change_in_order() {
    let server = serve().await;
    server
        .call(
            reqwest::Method::POST,
            ENTRIES,
            Some(entry("vm0", "10.0.0.1")),
        )
        .await;
    let response = server
        .http
        .get(format!("{}{ENTRIES}?watch=true", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut body = response.bytes_stream();
    let writer = async {
        for i in 1..=20 {
            server
                .call(
                    reqwest::Method::POST,
                    ENTRIES,
                    Some(entry(&format!("vm{i}"), "10.0.0.2")),
                )
                .await;
        }
        server
            .call(reqwest::Method::DELETE, &format!("{ENTRIES}/vm3"), None)
            .await;
    };
    let reader = async {
        let mut buffer = Vec::new();
        let mut events = Vec::new();
        while events.len() < 22 {
            let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                events.push(serde_json::from_slice::<Value>(&line).unwrap());
            }
        }
        events
    };
    let ((), events) = tokio::join!(writer, reader);
    let summary: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["type"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    let mut expected = vec!["ADDED vm0".to_string()];
    expected.extend((1..=20).map(|i| format!("ADDED vm{i}")));
    expected.push("DELETED vm3".into());
    assert_eq!(summary, expected);
    let versions: Vec<u64> = events[1..]
        .iter()
        .map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "resource versions increase: {versions:?}"
    );

    // Resuming from a list's resourceVersion replays only what came after.
    let (_, list) = server.call(reqwest::Method::GET, ENTRIES, None).await;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    server
        .call(reqwest::Method::DELETE, &format!("{ENTRIES}/vm4"), None)
        .await;
    let response = server
        .http
        .get(format!(
            "{}{ENTRIES}?watch=true&resourceVersion={rv}",
            server.base
        ))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let event: Value =
        serde_json::from_slice(chunk.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(
        (
            event["type"].as_str(),
            event["object"]["metadata"]["name"].as_str()
        ),
        (Some("DELETED"), Some("vm4"))
    );

    // A watch that asks for bookmarks gets one while nothing happens, with
    // the version it has reached; resumed from it, it misses nothing.
    let response = server
        .http
        .get(format!(
            "{}{ENTRIES}?watch=true&allowWatchBookmarks=true&resourceVersion={rv}",
            server.base
        ))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    let bookmark = loop {
        let chunk = tokio::time::timeout(Duration::from_secs(15), body.next())
            .await
            .expect("a bookmark within 15 s")
            .unwrap()
            .unwrap();
        buffer.extend_from_slice(&chunk);
        let lines: Vec<Value> = buffer
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        if let Some(bookmark) = lines.iter().find(|e| e["type"] == "BOOKMARK") {
            break bookmark.clone();
        }
    };
    assert_eq!(bookmark["object"]["kind"], "WorkloadEntry");
    let reached = bookmark["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reached.parse::<u64>().unwrap() > rv.parse::<u64>().unwrap());
    server
        .call(reqwest::Method::DELETE, &format!("{ENTRIES}/vm5"), None)
        .await;
    let response = server
        .http
        .get(format!(
            "{}{ENTRIES}?watch=true&resourceVersion={reached}",
            server.base
        ))
        .send()
        .await
        .unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(10), response.bytes_stream().next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let event: Value =
        serde_json::from_slice(chunk.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(event["object"]["metadata"]["name"], "vm5");
    server.running.shutdown().await;
}

#[tokio::test]
async fn apply_is_all_or_nothing_and_orders_namespaces() {
    let server = serve().await;
    let namespace =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "vm-workloads"}});
    let mut in_new_ns = entry("vm1", "10.0.0.1");
    in_new_ns["metadata"]["namespace"] = json!("vm-workloads");
    let mut broken = entry("vm2", "10.0.0.2");
    broken["spec"]["weight"] = json!("heavy");
    let (code, status) = server
        .call(
            reqwest::Method::POST,
            "/apis/vmesh.io/v1/apply",
            Some(json!({"items": [in_new_ns.clone(), namespace.clone(), broken]})),
        )
        .await;
    assert_eq!(code, 422, "{status}");
    assert!(
        status["message"].as_str().unwrap().starts_with("items[2]:"),
        "{status}"
    );
    let (code, _) = server
        .call(
            reqwest::Method::GET,
            "/api/v1/namespaces/vm-workloads",
            None,
        )
        .await;
    assert_eq!(code, 404, "nothing was applied");

    let (code, result) = server
        .call(
            reqwest::Method::POST,
            "/apis/vmesh.io/v1/apply",
            Some(json!({"items": [in_new_ns.clone(), namespace.clone()]})),
        )
        .await;
    assert_eq!(code, 200, "{result}");
    let outcomes: Vec<&str> = result["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["created", "created"]);
    let (_, result) = server
        .call(
            reqwest::Method::POST,
            "/apis/vmesh.io/v1/apply",
            Some(json!({"items": [in_new_ns, namespace]})),
        )
        .await;
    let outcomes: Vec<&str> = result["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["unchanged", "unchanged"]);
    server.running.shutdown().await;
}

#[tokio::test]
async fn objects_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_in(dir.path(), None, None).await;
    server
        .call(
            reqwest::Method::POST,
            ENTRIES,
            Some(entry("vm1", "10.0.0.1")),
        )
        .await;
    server.running.shutdown().await;
    let server = serve_in(dir.path(), None, None).await;
    let (code, got) = server
        .call(reqwest::Method::GET, &format!("{ENTRIES}/vm1"), None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(got["spec"]["ports"]["http"], 8080);
    server.running.shutdown().await;
}

#[tokio::test]
async fn token_is_required_when_configured_and_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_in(dir.path(), Some(TOKEN), None).await;
    let url = format!("{}{ENTRIES}", server.base);
    let refused = server.http.get(&url).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    let status: Value = refused.json().await.unwrap();
    assert_eq!(status["reason"], "Unauthorized");
    assert_eq!(
        server
            .http
            .get(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        server
            .http
            .get(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    server.running.shutdown().await;

    let open = start(ServerConfig {
        api_addr: "0.0.0.0:0".parse().unwrap(),
        ..ServerConfig::new(dir.path().join("other"))
    })
    .await;
    let err = open.unwrap_err().to_string();
    assert!(err.contains("--api-token-file"), "{err}");

    // A token that could be guessed is no token.
    let weak = start(ServerConfig {
        api_addr: "127.0.0.1:0".parse().unwrap(),
        api_token: Some("x".into()),
        ..ServerConfig::new(dir.path().join("weak"))
    })
    .await;
    let err = weak.unwrap_err().to_string();
    assert!(err.contains("at least 16"), "{err}");
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn config_dir_is_followed() {
    let data = tempfile::tempdir().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    let file = manifests.path().join("vm.yaml");
    std::fs::write(&file, "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm1}\nspec: {address: 10.0.0.1}\n").unwrap();
    let server = serve_in(data.path(), None, Some(manifests.path().to_path_buf())).await;
    let get = |name: &'static str| {
        let server = &server;
        async move {
            server
                .call(reqwest::Method::GET, &format!("{ENTRIES}/{name}"), None)
                .await
        }
    };
    eventually("the file's object", || async { get("vm1").await.0 == 200 }).await;

    std::fs::write(&file, "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm1}\nspec: {address: 10.0.0.9}\n").unwrap();
    eventually("the change", || async {
        get("vm1").await.1["spec"]["address"] == "10.0.0.9"
    })
    .await;

    // A broken edit keeps what was there.
    std::fs::write(&file, "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm1}\nspec: {address: 10.0.0.9, bogus: 1}\n").unwrap();
    let second = manifests.path().join("more.yaml");
    std::fs::write(&second, "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm2}\nspec: {address: 10.0.0.2}\n").unwrap();
    eventually("the new file", || async { get("vm2").await.0 == 200 }).await;
    assert_eq!(get("vm1").await.1["spec"]["address"], "10.0.0.9");

    std::fs::remove_file(&file).unwrap();
    eventually("the deletion", || async { get("vm1").await.0 == 404 }).await;
    assert_eq!(get("vm2").await.0, 200);
    server.running.shutdown().await;
}

fn operator(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "install.istio.io/v1alpha1",
        "kind": "IstioOperator",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

#[tokio::test]
async fn mesh_settings_are_resolved_from_the_stored_operators() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_in(dir.path(), Some(TOKEN), None).await;
    let get = |path: &str| {
        server
            .http
            .get(format!("{}{path}", server.base))
            .bearer_auth(TOKEN)
    };
    // Before any IstioOperator: the defaults.
    let settings: Value = get("/v1/mesh").send().await.unwrap().json().await.unwrap();
    assert_eq!(settings["trustDomain"], "cluster.local");
    assert_eq!(settings["trustDomainSet"], false);
    assert_eq!(settings["sources"], json!([]));

    let items = json!([
        operator(
            "default",
            "other",
            json!({
                "meshConfig": {"trustDomain": "other.example"},
                "values": {"global": {"meshID": "mesh2", "multiCluster": {"clusterName": "cluster2"}}},
            })
        ),
        operator(
            "istio-system",
            "base",
            json!({
                "meshConfig": {
                    "trustDomain": "corp.example",
                    "defaultConfig": {"holdApplicationUntilProxyStarts": true},
                },
                "values": {"global": {"meshID": "mesh1", "network": "network1"}},
            })
        ),
        operator(
            "istio-system",
            "canary",
            json!({
                "revision": "canary",
                "meshConfig": {"trustDomain": "canary.example"},
            })
        ),
    ]);
    let applied = server
        .http
        .post(format!("{}/apis/vmesh.io/v1/apply", server.base))
        .bearer_auth(TOKEN)
        .json(&json!({"items": items}))
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status().as_u16(), 200, "{:?}", applied.text().await);

    // The root namespace first, then by namespace and name; the first that
    // says something wins; other revisions are left out.
    let settings: Value = get("/v1/mesh").send().await.unwrap().json().await.unwrap();
    assert_eq!(settings["trustDomain"], "corp.example");
    assert_eq!(settings["trustDomainSet"], true);
    assert_eq!(settings["meshId"], "mesh1");
    assert_eq!(settings["clusterName"], "cluster2");
    assert_eq!(settings["network"], "network1");
    assert_eq!(
        settings["defaultConfig"],
        json!({"holdApplicationUntilProxyStarts": true})
    );
    assert_eq!(
        settings["sources"],
        json!(["istio-system/base", "default/other"])
    );
    let typed: vmesh_api::mesh::MeshSettings = serde_json::from_value(settings).unwrap();
    assert_eq!(typed.cluster_name.as_deref(), Some("cluster2"));

    let canary: Value = get("/v1/mesh?revision=canary")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(canary["trustDomain"], "canary.example");
    assert_eq!(canary["sources"], json!(["istio-system/canary"]));
    let default: Value = get("/v1/mesh?revision=default")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(default["trustDomain"], "corp.example");

    // Authenticated as the rest of the API is.
    let refused = server
        .http
        .get(format!("{}/v1/mesh", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    server.running.shutdown().await;
}

/// Objects over Kubernetes' 1.5 MiB are refused whole, whichever way they
/// come, and a body too large to hold one is refused before it is read.
#[tokio::test]
async fn oversized_objects_and_bodies_are_refused_with_413() {
    let server = serve().await;
    let config_map = |size: usize| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("cm-{size}"), "namespace": "default"},
            "data": {"k": "x".repeat(size)}})
    };
    let path = "/api/v1/namespaces/default/configmaps";
    let (code, status) = server
        .call(reqwest::Method::POST, path, Some(config_map(1_000_000)))
        .await;
    assert_eq!(code, 201, "a 1 MB object is fine: {status}");
    let (code, status) = server
        .call(reqwest::Method::POST, path, Some(config_map(2_000_000)))
        .await;
    assert_eq!(code, 413, "{status}");
    assert_eq!(status["reason"], "RequestEntityTooLarge");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("ConfigMap default/cm-2000000 is 2000"),
        "{status}"
    );
    // The same object in an apply list: nothing of the list is applied.
    let (code, status) = server
        .call(
            reqwest::Method::POST,
            "/apis/vmesh.io/v1/apply",
            Some(json!({"items": [config_map(10), config_map(2_000_000)]})),
        )
        .await;
    assert_eq!(code, 413, "{status}");
    let (code, _) = server
        .call(reqwest::Method::GET, &format!("{path}/cm-10"), None)
        .await;
    assert_eq!(code, 404, "nothing of the list was applied");
    // 100 MB is not read at all.
    let response = server
        .http
        .post(format!("{}{path}", server.base))
        .header("content-type", "application/json")
        .body(vec![b' '; 100 << 20])
        .send()
        .await;
    match response {
        Ok(response) => assert_eq!(response.status().as_u16(), 413),
        // The server may answer and close before the client has sent it all.
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    server.running.shutdown().await;
}

/// A tmpfs of `size` at a fresh directory, unmounted when dropped. Mounting
/// needs root, as CI has; without it the test fails, saying so.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs (needs root)");
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn config_map(name: &str, bytes: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"blob": "x".repeat(bytes)},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_clearly_and_they_resume_when_space_returns() {
    const CONFIG_MAPS: &str = "/api/v1/namespaces/default/configmaps";
    let disk = SmallDisk::mount("24m");
    let running = start(ServerConfig {
        api_addr: "127.0.0.1:0".parse().unwrap(),
        monitoring_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..ServerConfig::new(disk.dir.path().join("data"))
    })
    .await
    .unwrap();
    let server = Server {
        base: format!("http://{}", running.api_addr),
        http: reqwest::Client::new(),
        running,
        _dir: None,
    };
    let ready_url = format!("http://{}/ready", server.running.monitoring_addr.unwrap());
    let ready = || async {
        let response = reqwest::get(&ready_url).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    assert_eq!(ready().await.0, 200);

    // Fill the disk to the last byte.
    let filler = disk.dir.path().join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let small = [0u8; 512];
        while file.write_all(&small).is_ok() {}
    }
    // Writes go through while redb has room of its own, then fail: with 503
    // and the reason, and /ready says so too.
    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for i in 0..400 {
        let name = format!("blob-{i}");
        let (code, body) = server
            .call(
                reqwest::Method::POST,
                CONFIG_MAPS,
                Some(config_map(&name, 64 * 1024)),
            )
            .await;
        match code {
            201 => acknowledged.push(name),
            _ => {
                refusal = Some((code, body));
                break;
            }
        }
    }
    let (code, body) = refusal.expect("a full disk refuses writes");
    assert_eq!(code, 503, "{body}");
    let message = body["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("No space left on device"), "{message}");
    let (code, text) = ready().await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("No space left on device"), "{text}");

    // Space comes back: readiness and writes return without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ready().await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still not ready 10 s after space returned: {}",
            ready().await.1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, body) = server
        .call(
            reqwest::Method::POST,
            CONFIG_MAPS,
            Some(config_map("after", 1024)),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    // Nothing acknowledged was lost.
    for name in &acknowledged {
        let (code, body) = server
            .call(reqwest::Method::GET, &format!("{CONFIG_MAPS}/{name}"), None)
            .await;
        assert_eq!(code, 200, "{name}: {body}");
    }
    server.running.shutdown().await;
}

#[tokio::test]
async fn lists_page_with_limit_and_continue_and_select_as_kubernetes_does() {
    let server = serve().await;
    for i in 0..25 {
        let mut object = entry(&format!("vm{i:02}"), &format!("10.0.0.{i}"));
        object["metadata"]["labels"] =
            json!({"app": if i % 2 == 0 { "even" } else { "odd" }, "n": i.to_string()});
        let (code, body) = server
            .call(reqwest::Method::POST, ENTRIES, Some(object))
            .await;
        assert_eq!(code, 201, "{body}");
    }
    let names = |list: &Value| -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };

    // Pages of 10 until there is no continue token: every object once, in order.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &token {
            Some(token) => format!("{ENTRIES}?limit=10&continue={token}"),
            None => format!("{ENTRIES}?limit=10"),
        };
        let (code, page) = server.call(reqwest::Method::GET, &path, None).await;
        assert_eq!(code, 200, "{page}");
        assert_eq!(page["kind"], "WorkloadEntryList");
        assert!(page["metadata"]["resourceVersion"].is_string());
        pages += 1;
        seen.extend(names(&page));
        match page["metadata"]["continue"].as_str() {
            Some(next) => token = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let all: Vec<String> = (0..25).map(|i| format!("vm{i:02}")).collect();
    assert_eq!(seen, all);

    // Label selectors, equality and set-based, with limit.
    let (_, even) = server
        .call(
            reqwest::Method::GET,
            &format!("{ENTRIES}?labelSelector=app%3Deven"),
            None,
        )
        .await;
    assert_eq!(names(&even).len(), 13);
    let (_, some) = server
        .call(
            reqwest::Method::GET,
            &format!("{ENTRIES}?labelSelector=n%20in%20(3,4,5),app!%3Deven"),
            None,
        )
        .await;
    assert_eq!(names(&some), ["vm03", "vm05"]);
    let (_, first_even) = server
        .call(
            reqwest::Method::GET,
            &format!("{ENTRIES}?labelSelector=app%3Deven&limit=2"),
            None,
        )
        .await;
    assert_eq!(names(&first_even), ["vm00", "vm02"]);
    assert!(first_even["metadata"]["continue"].is_string());
    // Field selectors on name and namespace, across namespaces too.
    let (_, one) = server
        .call(
            reqwest::Method::GET,
            "/apis/networking.istio.io/v1/workloadentries?fieldSelector=metadata.name%3Dvm07,metadata.namespace%3Ddefault",
            None,
        )
        .await;
    assert_eq!(names(&one), ["vm07"]);

    // What cannot be read is a 400 naming it, never a silent full list.
    for (query, says) in [
        ("labelSelector=app%3Dnot%20valid", "labelSelector"),
        (
            "fieldSelector=spec.address%3D10.0.0.1",
            "cannot be selected on",
        ),
        ("limit=5&continue=bm90LWEtdG9rZW4", "not a continue token"),
    ] {
        let (code, body) = server
            .call(reqwest::Method::GET, &format!("{ENTRIES}?{query}"), None)
            .await;
        assert_eq!(code, 400, "{query}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(says),
            "{query}: {body}"
        );
    }
    // A continue token of another list is refused too.
    let services_token = {
        let (_, page) = server
            .call(reqwest::Method::GET, &format!("{ENTRIES}?limit=1"), None)
            .await;
        page["metadata"]["continue"].as_str().unwrap().to_string()
    };
    let (code, body) = server
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/namespaces/default/services?limit=1&continue={services_token}"),
            None,
        )
        .await;
    assert_eq!(code, 400, "{body}");
}
