//! `vmesh doctor`: what is wrong with the mesh, in one look. It reads what
//! the server already records — WorkloadGroup refusals, WorkloadEntry health
//! and disconnections, proxies that refused or have not taken their config —
//! and prints one line per finding, `ok`, `warn` or `FAIL`; it exits 1 when
//! anything failed.
//!
//! It changes nothing and does not reach the VMs themselves.

use std::process::ExitCode;

use anyhow::Result;
use serde_json::Value;
use vmesh_api::kinds::{workload_entry, workload_group};

use crate::Connection;
use crate::client::{Client, proxy_statuses};

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
enum Level {
    Ok,
    Warn,
    Fail,
}

struct Finding {
    level: Level,
    subject: String,
    message: String,
}

fn name_of(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or("-"),
        object["metadata"]["name"].as_str().unwrap_or("-")
    )
}

fn conditions(object: &Value) -> impl Iterator<Item = &Value> {
    object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
}

/// Refused registrations on groups.
fn group_findings(groups: &[Value]) -> Vec<Finding> {
    groups
        .iter()
        .flat_map(|group| {
            conditions(group)
                .filter(|c| c["type"] == "AutoRegistration" && c["status"] == "False")
                .map(|c| Finding {
                    level: Level::Fail,
                    subject: format!("WorkloadGroup {}", name_of(group)),
                    message: format!(
                        "auto-registration refused at {}: {}",
                        c["lastTransitionTime"].as_str().unwrap_or("?"),
                        c["message"].as_str().unwrap_or("")
                    ),
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Unhealthy, unchecked-yet and disconnected entries.
fn entry_findings(entries: &[Value]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for entry in entries {
        let subject = format!("WorkloadEntry {}", name_of(entry));
        let annotations = &entry["metadata"]["annotations"];
        let healthy = conditions(entry).find(|c| c["type"] == "Healthy");
        match healthy {
            Some(c) if c["status"] == "False" => findings.push(Finding {
                level: Level::Warn,
                subject: subject.clone(),
                message: format!(
                    "unhealthy since {}, out of the load balancing: {}",
                    c["lastTransitionTime"].as_str().unwrap_or("?"),
                    c["message"].as_str().unwrap_or("")
                ),
            }),
            None if annotations["proxy.istio.io/health-checks-enabled"] == "true" => {
                findings.push(Finding {
                    level: Level::Warn,
                    subject: subject.clone(),
                    message: "health-checked, but no report yet: out of the load balancing".into(),
                })
            }
            _ => {}
        }
        if let Some(since) = annotations["istio.io/disconnectedAt"].as_str() {
            findings.push(Finding {
                level: Level::Warn,
                subject,
                message: format!("its proxy disconnected at {since}; deleted after the grace period unless it returns"),
            });
        }
    }
    findings
}

/// Proxies that refused config, or are behind.
fn proxy_findings(proxies: &[Value]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for proxy in proxies {
        let subject = format!("proxy {}", proxy["id"].as_str().unwrap_or("?"));
        for (type_url, status) in proxy["types"].as_object().into_iter().flatten() {
            if let Some([version, message]) = status["nack"].as_array().map(Vec::as_slice) {
                findings.push(Finding {
                    level: Level::Fail,
                    subject: subject.clone(),
                    message: format!(
                        "refused {} version {}: {}",
                        type_url.rsplit('.').next().unwrap_or(type_url),
                        version.as_str().unwrap_or("?"),
                        message.as_str().unwrap_or("")
                    ),
                });
            }
        }
        for (kind, state) in proxy["sync"].as_object().into_iter().flatten() {
            if state == "STALE" {
                findings.push(Finding {
                    level: Level::Warn,
                    subject: subject.clone(),
                    message: format!("{kind} is {}", state.as_str().unwrap_or("?")),
                });
            }
        }
    }
    findings
}

pub async fn run(connection: &Connection, monitoring: &str) -> Result<ExitCode> {
    let client = Client::config_api(connection)?;
    let items =
        |list: Value| -> Vec<Value> { list["items"].as_array().cloned().unwrap_or_default() };
    let groups = items(
        client
            .get(
                &workload_group::KIND.path(None, None),
                "listing WorkloadGroups",
            )
            .await?,
    );
    let entries = items(
        client
            .get(
                &workload_entry::KIND.path(None, None),
                "listing WorkloadEntries",
            )
            .await?,
    );
    let proxies = proxy_statuses(monitoring).await?;

    let mut findings = group_findings(&groups);
    findings.extend(entry_findings(&entries));
    findings.extend(proxy_findings(&proxies));
    findings.sort_by_key(|f| std::cmp::Reverse(f.level));
    findings.push(Finding {
        level: Level::Ok,
        subject: "mesh".into(),
        message: format!(
            "{} WorkloadGroups, {} WorkloadEntries, {} connected proxies",
            groups.len(),
            entries.len(),
            proxies.len()
        ),
    });
    for finding in &findings {
        let level = match finding.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        println!("{level}  {}: {}", finding.subject, finding.message);
    }
    Ok(if findings.iter().any(|f| f.level == Level::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn refusals_health_and_nacks_are_found() {
        let groups = [json!({
            "metadata": {"name": "payment-vms", "namespace": "vm-workloads"},
            "status": {"conditions": [{"type": "AutoRegistration", "status": "False",
                "message": "vm~10.0.0.9: its identity is vm-workloads/intruder-sa"}]},
        })];
        let found = group_findings(&groups);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].level, Level::Fail);
        assert!(found[0].message.contains("intruder-sa"));

        let entries = [
            json!({"metadata": {"name": "a", "namespace": "n"},
                   "status": {"conditions": [{"type": "Healthy", "status": "False", "message": "HTTP 503"}]}}),
            json!({"metadata": {"name": "b", "namespace": "n",
                   "annotations": {"proxy.istio.io/health-checks-enabled": "true", "istio.io/disconnectedAt": "t"}}}),
            json!({"metadata": {"name": "c", "namespace": "n"},
                   "status": {"conditions": [{"type": "Healthy", "status": "True"}]}}),
        ];
        let found = entry_findings(&entries);
        let subjects: Vec<&str> = found.iter().map(|f| f.subject.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "WorkloadEntry n/a",
                "WorkloadEntry n/b",
                "WorkloadEntry n/b"
            ]
        );
        assert!(found[0].message.contains("HTTP 503"));

        let proxies = [
            json!({"id": "sidecar~1", "types": {"type.googleapis.com/envoy.config.cluster.v3.Cluster":
            {"nack": ["v1", "bad cluster"]}}, "sync": {"CDS": "NACKED", "EDS": "STALE"}}),
        ];
        let found = proxy_findings(&proxies);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].level, Level::Fail);
        assert!(found[0].message.contains("bad cluster"));
        assert_eq!(found[1].message, "EDS is STALE");
    }
}
