//! `vmesh doctor`: what is wrong with the mesh, in one look. It reads what
//! the server already records — WorkloadGroup refusals, WorkloadEntry health
//! and disconnections, proxies that refused or have not taken their config —
//! and what `vmesh analyze -A` finds in the server's objects, and prints one
//! line per finding, `ok`, `warn` or `FAIL`; it exits 1 when anything failed
//! (an analysis error among them).
//!
//! It changes nothing and does not reach the VMs themselves.

use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::Value;
use vmesh_api::kinds::{workload_entry, workload_group};
use vmesh_registry::analysis::{Level as MessageLevel, Message};

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

/// What the analyzers found: errors fail, warnings warn, information is left out.
fn analysis_findings(messages: &[Message]) -> Vec<Finding> {
    messages
        .iter()
        .filter_map(|m| {
            let level = match m.level() {
                MessageLevel::Error => Level::Fail,
                MessageLevel::Warning => Level::Warn,
                MessageLevel::Info => return None,
            };
            Some(Finding {
                level,
                subject: m
                    .resource
                    .as_ref()
                    .map_or_else(|| "mesh".into(), |r| r.friendly_name()),
                message: format!("[{}] {}", m.code.code, m.text),
            })
        })
        .collect()
}

/// The monitoring port of the server at `server`: its host, port 15014.
fn monitoring_of(server: &str) -> Result<String> {
    let mut url =
        reqwest::Url::parse(server).with_context(|| format!("--server {server:?} is not a URL"))?;
    url.set_port(Some(MONITORING_PORT))
        .ok()
        .with_context(|| format!("--server {server:?} has no host"))?;
    Ok(url.origin().ascii_serialization())
}

/// The server's monitoring port when `--monitoring` does not say (Istio's 15014).
const MONITORING_PORT: u16 = 15014;

/// Every connected proxy's sync status, from `monitoring` or, when it is
/// not given, from the monitoring port on the host of the server the CLI
/// was pointed at; an error names the address it tried.
pub async fn proxy_statuses_of(
    connection: &Connection,
    monitoring: Option<&str>,
) -> Result<Vec<Value>> {
    let (monitoring, derived) = match monitoring {
        Some(monitoring) => (monitoring.to_string(), false),
        None => (monitoring_of(&connection.server)?, true),
    };
    proxy_statuses(&monitoring).await.with_context(|| {
        if derived {
            format!("the monitoring port tried is {monitoring}: --server's host, port {MONITORING_PORT}; give --monitoring or VMESH_MONITORING if it is elsewhere")
        } else {
            format!("the monitoring port tried is {monitoring}")
        }
    })
}

pub async fn run(connection: &Connection, monitoring: Option<&str>) -> Result<ExitCode> {
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
    let messages = crate::analyze::live_messages(&client).await?;
    let proxies = proxy_statuses_of(connection, monitoring).await?;

    let mut findings = group_findings(&groups);
    findings.extend(entry_findings(&entries));
    findings.extend(proxy_findings(&proxies));
    findings.extend(analysis_findings(&messages));
    findings.sort_by_key(|f| std::cmp::Reverse(f.level));
    findings.push(Finding {
        level: Level::Ok,
        subject: "mesh".into(),
        message: format!(
            "{} WorkloadGroups, {} WorkloadEntries, {} connected proxies, {} analysis messages",
            groups.len(),
            entries.len(),
            proxies.len(),
            messages.len()
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

    #[test]
    fn the_monitoring_port_is_on_the_servers_host() {
        assert_eq!(
            monitoring_of("http://10.1.2.3:15080").unwrap(),
            "http://10.1.2.3:15014"
        );
        assert_eq!(
            monitoring_of("https://istiod.example.com/").unwrap(),
            "https://istiod.example.com:15014"
        );
        assert_eq!(
            monitoring_of("http://[::1]:15080").unwrap(),
            "http://[::1]:15014"
        );
        assert!(monitoring_of("127.0.0.1:15080").is_err());
    }

    #[test]
    fn analysis_errors_fail_and_warnings_warn() {
        let messages = [
            Message::schema(true, "VirtualService ns/vs", "spec", "broken"),
            Message::schema(false, "Telemetry ns/t", "spec", "not applied"),
        ];
        let found = analysis_findings(&messages);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].level, Level::Fail);
        assert_eq!(found[0].subject, "VirtualService ns/vs");
        assert_eq!(
            found[0].message,
            "[IST0106] Schema validation error: spec: broken"
        );
        assert_eq!(found[1].level, Level::Warn);
    }
}
