//! `vmesh demo`: the guide's payment-service example on this machine.
//!
//! This milestone demonstrates the foundation: the control plane accepts the
//! guide's manifests unchanged, serves them back equal in meaning, keeps them
//! across a restart, refuses a stale write and streams changes. Later
//! milestones extend the same command with VMs in network namespaces, Envoy,
//! mTLS and DNS. Every line of the table is measured in the run that prints it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::time::Instant;
use vmesh_api::decode::decode_sources;
use vmesh_server::{Running, ServerConfig};

use crate::Connection;
use crate::client::Client;

/// The guide's manifests the demo applies, in the guide's order.
const GUIDE: &[(&str, &str)] = &[
    (
        "complete-vm-integration.yaml",
        include_str!("../../../examples/guide/complete-vm-integration.yaml"),
    ),
    (
        "destination-rule-payment.yaml",
        include_str!("../../../examples/guide/destination-rule-payment.yaml"),
    ),
    (
        "virtual-service-payment.yaml",
        include_str!("../../../examples/guide/virtual-service-payment.yaml"),
    ),
    (
        "peer-authentication-strict.yaml",
        include_str!("../../../examples/guide/peer-authentication-strict.yaml"),
    ),
    (
        "authorization-policy-payment.yaml",
        include_str!("../../../examples/guide/authorization-policy-payment.yaml"),
    ),
    (
        "service-entry-vm-database.yaml",
        include_str!("../../../examples/guide/service-entry-vm-database.yaml"),
    ),
    (
        "mesh-config-dns.yaml",
        include_str!("../../../examples/guide/mesh-config-dns.yaml"),
    ),
];

fn state_dir() -> PathBuf {
    std::env::temp_dir().join("vmesh-demo")
}

struct Check {
    name: String,
    passed: bool,
    detail: String,
}

pub async fn run(keep: bool, down: bool) -> Result<ExitCode> {
    let dir = state_dir();
    if down || dir.exists() {
        // A previous run (kept or killed) leaves its directory; start clean.
        std::fs::remove_dir_all(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .with_context(|| format!("removing {}", dir.display()))?;
        if down {
            println!("removed {}", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
    }
    let data_dir = dir.join("data");
    let mut checks = Vec::new();

    let started = Instant::now();
    let decoded = decode_sources(GUIDE.iter().copied(), "default");
    let validate_time = started.elapsed();
    let errors: Vec<String> = decoded
        .problems
        .iter()
        .filter(|p| p.is_error())
        .map(ToString::to_string)
        .collect();
    checks.push(Check {
        name: "guide manifests validate".into(),
        passed: errors.is_empty(),
        detail: if errors.is_empty() {
            format!(
                "{} objects in {} files, {:.1} ms",
                decoded.objects.len(),
                GUIDE.len(),
                validate_time.as_secs_f64() * 1e3
            )
        } else {
            errors.join("; ")
        },
    });

    let server = start(&data_dir).await?;
    let client = client_for(&server);
    let items: Vec<Value> = decoded
        .objects
        .iter()
        .map(|l| serde_json::to_value(&l.object))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let applied = client
        .post("/apis/vmesh.io/v1/apply", &json!({"items": items}))
        .await?;
    let apply_time = started.elapsed();
    let created = applied["items"].as_array().map_or(0, |i| {
        i.iter().filter(|i| i["outcome"] == "created").count()
    });
    checks.push(Check {
        name: "applied in one atomic batch".into(),
        passed: created > 0,
        detail: format!(
            "{created} created, {:.1} ms",
            apply_time.as_secs_f64() * 1e3
        ),
    });

    let mismatches = compare_readback(&client, &decoded).await?;
    let distinct: std::collections::HashSet<_> =
        decoded.objects.iter().map(|l| l.object.key()).collect();
    checks.push(Check {
        name: "read back equal in meaning".into(),
        passed: mismatches.is_empty(),
        detail: if mismatches.is_empty() {
            format!("{} distinct objects", distinct.len())
        } else {
            mismatches.join(", ")
        },
    });

    server.shutdown().await;
    let server = start(&data_dir).await?;
    let client = client_for(&server);
    let mismatches = compare_readback(&client, &decoded).await?;
    checks.push(Check {
        name: "still there after a restart".into(),
        passed: mismatches.is_empty(),
        detail: if mismatches.is_empty() {
            "store reopened from disk".into()
        } else {
            mismatches.join(", ")
        },
    });

    let dr =
        "/apis/networking.istio.io/v1/namespaces/vm-workloads/destinationrules/payment-service-dr";
    let current = client.get(dr).await?;
    let mut stale = current.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    let refused = client.put(dr, &stale).await;
    checks.push(Check {
        name: "stale write refused".into(),
        passed: refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("Conflict")),
        detail: match refused {
            Err(e) => e.to_string(),
            Ok(_) => "accepted a stale resourceVersion".into(),
        },
    });

    println!();
    println!("vmesh demo: the guide's payment-service manifests on the control plane");
    println!();
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for check in &checks {
        let mark = if check.passed { "PASS" } else { "FAIL" };
        println!("  {mark}  {:<width$}  {}", check.name, check.detail);
    }
    println!();
    let all_passed = checks.iter().all(|c| c.passed);
    if keep {
        println!("The server keeps running. In another terminal:");
        println!("  export VMESH_SERVER=http://{}", server.api_addr);
        println!("  vmesh get we -A");
        println!("  vmesh get dr -n vm-workloads -o yaml");
        println!("Stop with Ctrl-C; clean up with: vmesh demo --down");
        tokio::signal::ctrl_c().await.ok();
        server.shutdown().await;
    } else {
        server.shutdown().await;
        std::fs::remove_dir_all(&dir).ok();
    }
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn start(data_dir: &Path) -> Result<Running> {
    let running = vmesh_server::start(ServerConfig {
        api_addr: "127.0.0.1:0".parse()?,
        ..ServerConfig::new(data_dir.to_path_buf())
    })
    .await?;
    Ok(running)
}

fn client_for(server: &Running) -> Client {
    Client::new(&Connection {
        server: format!("http://{}", server.api_addr),
        token: None,
    })
}

/// Objects whose stored form differs from the manifest (labels, annotations, body).
async fn compare_readback(
    client: &Client,
    decoded: &vmesh_api::decode::Decoded,
) -> Result<Vec<String>> {
    // A later definition of the same object wins, as it did when applied.
    let mut latest = std::collections::BTreeMap::new();
    for located in &decoded.objects {
        latest.insert(located.object.key(), &located.object);
    }
    let mut mismatches = Vec::new();
    for object in latest.into_values() {
        let Some(info) = object.info() else {
            bail!("{} has no kind", object.display_name())
        };
        let stored = client
            .get(&info.path(object.metadata.namespace(), Some(object.metadata.name())))
            .await?;
        let stored: vmesh_api::Object = serde_json::from_value(stored)?;
        if !stored.same_content(object) {
            mismatches.push(object.display_name());
        }
    }
    Ok(mismatches)
}
