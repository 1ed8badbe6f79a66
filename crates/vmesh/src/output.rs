//! How `vmesh get` prints objects: tables as kubectl does, or YAML, JSON, names.

use std::time::SystemTime;

use anyhow::Result;
use serde_json::{Value, json};
use vmesh_api::table::cell;
use vmesh_api::{KindInfo, table};

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
    let columns: Vec<table::Column> = table::columns(info)
        .into_iter()
        .filter(|c| wide || c.priority == 0)
        .collect();
    let mut headers: Vec<&str> = Vec::new();
    if all_namespaces && info.namespaced {
        headers.push("NAMESPACE");
    }
    headers.push("NAME");
    headers.extend(columns.iter().map(|c| c.name));
    if wide {
        headers.push("LABELS");
    }
    let now = SystemTime::now();
    let rows: Vec<Vec<String>> = objects
        .iter()
        .map(|o| {
            let mut row = Vec::new();
            if all_namespaces && info.namespaced {
                row.push(table::cell(o["metadata"].get("namespace")));
            }
            row.extend(table::row(&columns, o, now));
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
            "NAMESPACE   NAME           AGE         ADDRESS\n\
             a           vm1            <unknown>   10.0.0.1\n\
             b           long-name-vm   <unknown>   <none>\n"
        );
    }

    #[test]
    fn services_and_endpoints_read_like_kubectl() {
        let svc = vmesh_api::kind_for("svc").unwrap();
        let services = vec![
            json!({"metadata": {"name": "payment-service"}, "spec": {"type": "ClusterIP", "clusterIP": "10.96.92.5",
                "ports": [{"name": "http", "port": 8080}, {"name": "grpc", "port": 9090, "protocol": "TCP"}]}}),
            json!({"metadata": {"name": "istio-eastwestgateway"}, "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.9",
                "externalIPs": ["192.0.2.10"], "ports": [{"port": 15012, "nodePort": 31012}]}}),
            json!({"metadata": {"name": "lb"}, "spec": {"type": "LoadBalancer", "ports": [{"port": 53, "protocol": "UDP"}]}}),
            json!({"metadata": {"name": "db"}, "spec": {"type": "ExternalName", "externalName": "db.example.com"}}),
        ];
        assert_eq!(
            table(svc, &services, false, false),
            "NAME                    TYPE           CLUSTER-IP   EXTERNAL-IP      PORT(S)             AGE\n\
             payment-service         ClusterIP      10.96.92.5   <none>           8080/TCP,9090/TCP   <unknown>\n\
             istio-eastwestgateway   LoadBalancer   10.96.0.9    192.0.2.10       15012:31012/TCP     <unknown>\n\
             lb                      LoadBalancer   <none>       <pending>        53/UDP              <unknown>\n\
             db                      ExternalName   <none>       db.example.com   <none>              <unknown>\n"
        );

        let ep = vmesh_api::view_for("ep").unwrap();
        let subset = |ips: &[&str], ports: &[u16]| {
            json!({"addresses": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
                   "ports": ports.iter().map(|p| json!({"port": p})).collect::<Vec<_>>()})
        };
        let endpoints = vec![
            json!({"metadata": {"name": "payment-service"}, "subsets": [subset(&["10.0.0.1", "10.0.0.2"], &[8080, 9090])]}),
            json!({"metadata": {"name": "one"}, "subsets": [subset(&["2001:db8::1"], &[80])]}),
            json!({"metadata": {"name": "none"}}),
        ];
        assert_eq!(
            table(ep, &endpoints, false, false),
            "NAME              ENDPOINTS                                               AGE\n\
             payment-service   10.0.0.1:8080,10.0.0.2:8080,10.0.0.1:9090 + 1 more...   <unknown>\n\
             one               [2001:db8::1]:80                                        <unknown>\n\
             none              <none>                                                  <unknown>\n"
        );
    }
}
