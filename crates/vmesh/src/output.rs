//! How `vmesh get` prints objects: tables as kubectl does, or YAML, JSON, names.

use std::time::SystemTime;

use anyhow::Result;
use serde_json::{Value, json};
use vmesh_api::KindInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Yaml,
    Json,
    Wide,
    Name,
}

/// Prints `objects`; `single` prints one object rather than a `List`.
pub fn print(
    info: &KindInfo,
    objects: &[Value],
    format: Option<Format>,
    all_namespaces: bool,
    single: bool,
) -> Result<()> {
    match format {
        Some(Format::Yaml) | Some(Format::Json) => {
            let value = if single {
                objects[0].clone()
            } else {
                json!({"apiVersion": "v1", "kind": "List", "items": objects})
            };
            let text = if format == Some(Format::Yaml) {
                serde_saphyr::to_string(&value)?
            } else {
                serde_json::to_string_pretty(&value)? + "\n"
            };
            print!("{text}");
        }
        Some(Format::Name) => {
            for object in objects {
                println!(
                    "{}/{}",
                    info.qualified_name(),
                    object["metadata"]["name"].as_str().unwrap_or_default()
                );
            }
        }
        None | Some(Format::Wide) => print!(
            "{}",
            table(info, objects, format == Some(Format::Wide), all_namespaces)
        ),
    }
    Ok(())
}

/// `vmesh proxy-status`: one row per proxy, its sync state per xDS type.
pub fn proxy_status_table(proxies: &[Value]) -> String {
    let headers = ["NAME", "NAMESPACE", "CDS", "LDS", "EDS", "RDS"];
    let rows: Vec<Vec<String>> = proxies
        .iter()
        .map(|p| {
            let mut row = vec![cell(p.get("id")), cell(p.get("namespace"))];
            row.extend(
                headers[2..]
                    .iter()
                    .map(|t| cell(p["sync"].get(*t)).replace("<none>", "-")),
            );
            row
        })
        .collect();
    let mut out = align(&headers, &rows);
    // Refusals are the point of looking: say what Envoy said.
    for proxy in proxies {
        for (type_url, status) in proxy["types"].as_object().into_iter().flatten() {
            if let Some([version, message]) = status["nack"].as_array().map(Vec::as_slice) {
                let kind = type_url.rsplit('.').next().unwrap_or(type_url);
                out.push_str(&format!(
                    "{} refused {kind} version {}: {}\n",
                    cell(proxy.get("id")),
                    cell(Some(version)),
                    cell(Some(message))
                ));
            }
        }
    }
    out
}

/// `vmesh proxy-config dns`: where the proxy listens and forwards, then
/// one row per mesh name.
pub fn dns_table(dump: &Value) -> String {
    let list = |key: &str| {
        dump[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!(
        "listening on {}; forwarding to {}; search domains: {}\n",
        list("listen"),
        list("upstreams"),
        if list("search").is_empty() {
            "none".to_string()
        } else {
            list("search")
        }
    );
    let rows: Vec<Vec<String>> = dump["names"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, ips)| {
            let ips: Vec<&str> = ips
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            vec![name.clone(), ips.join(",")]
        })
        .collect();
    out.push_str(&align(&["NAME", "ADDRESSES"], &rows));
    out
}

/// Left-aligned columns three spaces apart, as kubectl prints them.
pub fn align(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("   ").trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn table(info: &KindInfo, objects: &[Value], wide: bool, all_namespaces: bool) -> String {
    let mut headers: Vec<&str> = Vec::new();
    if all_namespaces && info.namespaced {
        headers.push("NAMESPACE");
    }
    headers.push("NAME");
    headers.extend(info.columns.iter().map(|(h, _)| *h));
    headers.push("AGE");
    if wide {
        headers.push("LABELS");
    }
    let now = SystemTime::now();
    let rows: Vec<Vec<String>> = objects
        .iter()
        .map(|o| {
            let mut row = Vec::new();
            if all_namespaces && info.namespaced {
                row.push(
                    o["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
            row.push(
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
            for (_, pointer) in info.columns {
                row.push(cell(o.pointer(pointer)));
            }
            row.push(age(o["metadata"]["creationTimestamp"].as_str(), now));
            if wide {
                let labels = o["metadata"]["labels"].as_object().map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                });
                row.push(
                    labels
                        .filter(|l| !l.is_empty())
                        .unwrap_or_else(|| "<none>".into()),
                );
            }
            row
        })
        .collect();
    align(&headers, &rows)
}

fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "<none>".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => {
            let parts: Vec<String> = items.iter().map(|v| cell(Some(v))).collect();
            format!("[{}]", parts.join(","))
        }
        Some(other) => other.to_string(),
    }
}

/// kubectl-style age: `45s`, `12m`, `5h`, `3d`.
fn age(created: Option<&str>, now: SystemTime) -> String {
    let Some(created) = created.and_then(|c| humantime::parse_rfc3339(c).ok()) else {
        return "<unknown>".into();
    };
    let secs = now
        .duration_since(created)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match secs {
        0..120 => format!("{secs}s"),
        120..7200 => format!("{}m", secs / 60),
        7200..172_800 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_show_kind_columns() {
        let info = vmesh_api::kind_for("we").unwrap();
        let objects = vec![
            json!({"metadata": {"name": "vm1", "namespace": "a"}, "spec": {"address": "10.0.0.1"}}),
            json!({"metadata": {"name": "long-name-vm", "namespace": "b"}, "spec": {}}),
        ];
        let text = table(info, &objects, false, true);
        assert_eq!(
            text,
            "NAMESPACE   NAME           ADDRESS    AGE\n\
             a           vm1            10.0.0.1   <unknown>\n\
             b           long-name-vm   <none>     <unknown>\n"
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        let now = SystemTime::now();
        let then =
            humantime::format_rfc3339_seconds(now - std::time::Duration::from_secs(3 * 3600))
                .to_string();
        assert_eq!(age(Some(&then), now), "3h");
    }
}
