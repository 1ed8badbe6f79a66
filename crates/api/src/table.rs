//! The columns `kubectl get` shows for each kind and the cells of one
//! object's row: Istio's CRDs' `additionalPrinterColumns` for Istio's kinds
//! (in their order, `AGE` where the CRD puts it), kubectl's own printers'
//! columns for the Kubernetes kinds. The server answers Kubernetes' Table
//! format from these and `vmesh get` prints them, so both show the same.
//!
//! Not here: alignment and printing (the CLI), the Table envelope (the
//! server).

use std::time::SystemTime;

use serde_json::Value;

use crate::KindInfo;

/// One column after `NAME`.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// The header, as kubectl prints it.
    pub name: &'static str,
    /// Kubernetes' column type: `string`, `integer` or `date`.
    pub kind: &'static str,
    /// 0 for every listing, 1 for `-o wide` only.
    pub priority: u8,
    value: Cell,
}

#[derive(Debug, Clone, Copy)]
enum Cell {
    /// The value at a JSON pointer into the object.
    Field(&'static str),
    /// How long ago the object was created.
    Age,
    /// Worked out from several fields, as kubectl's printers do.
    Computed(fn(&Value) -> String),
}

/// The columns of a kind after `NAME`, `AGE` included.
pub fn columns(info: &KindInfo) -> Vec<Column> {
    let string = |name, pointer| Column {
        name,
        kind: "string",
        priority: 0,
        value: Cell::Field(pointer),
    };
    let computed = |name, kind, priority, f| Column {
        name,
        kind,
        priority,
        value: Cell::Computed(f),
    };
    let age = Column {
        name: "AGE",
        kind: "date",
        priority: 0,
        value: Cell::Age,
    };
    let mut columns: Vec<Column> = info
        .columns
        .iter()
        .map(|&(name, pointer)| match name {
            "AGE" => age,
            _ => string(name, pointer),
        })
        .collect();
    match (info.group, info.kind) {
        ("", "Namespace") => columns.push(string("STATUS", "/status/phase")),
        ("", "ServiceAccount") => columns.push(computed("SECRETS", "integer", 0, secrets)),
        ("", "ConfigMap") => columns.push(computed("DATA", "integer", 0, data_entries)),
        ("", "Service") => columns.extend([
            computed("EXTERNAL-IP", "string", 0, service_external_ip),
            computed("PORT(S)", "string", 0, service_ports),
        ]),
        ("", "Endpoints") => columns.push(computed("ENDPOINTS", "string", 0, endpoints_summary)),
        ("discovery.k8s.io", "EndpointSlice") => columns.extend([
            string("ADDRESSTYPE", "/addressType"),
            computed("PORTS", "string", 0, slice_ports),
            computed("ENDPOINTS", "string", 0, slice_endpoints),
        ]),
        _ => {}
    }
    if !columns.iter().any(|c| matches!(c.value, Cell::Age)) {
        columns.push(age);
    }
    if (info.group, info.kind) == ("", "Service") {
        columns.push(computed("SELECTOR", "string", 1, service_selector));
    }
    columns
}

/// The row of `object`: its name, then a cell per column.
pub fn row(columns: &[Column], object: &Value, now: SystemTime) -> Vec<String> {
    let mut cells = vec![
        object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    ];
    for column in columns {
        cells.push(match column.value {
            Cell::Field(pointer) => cell(object.pointer(pointer)),
            Cell::Age => age(object["metadata"]["creationTimestamp"].as_str(), now),
            Cell::Computed(f) => f(object),
        });
    }
    cells
}

/// A value as kubectl prints it in a cell: `<none>` for nothing, lists in brackets.
pub fn cell(value: Option<&Value>) -> String {
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
pub fn age(created: Option<&str>, now: SystemTime) -> String {
    let Some(created) = created.and_then(parse_rfc3339) else {
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

/// An RFC 3339 time as the store writes it (`2026-12-05T10:00:00Z`).
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok()
}

fn strings(value: &Value) -> impl Iterator<Item = &str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

fn secrets(account: &Value) -> String {
    account["secrets"]
        .as_array()
        .map_or(0, Vec::len)
        .to_string()
}

fn data_entries(config_map: &Value) -> String {
    let count = |field: &str| config_map[field].as_object().map_or(0, |m| m.len());
    (count("data") + count("binaryData")).to_string()
}

/// kubectl's EXTERNAL-IP: the external name, the load balancer's addresses
/// and `externalIPs`; `<pending>` for a load balancer without one.
fn service_external_ip(service: &Value) -> String {
    let spec = &service["spec"];
    if spec["type"] == "ExternalName" {
        return cell(spec.get("externalName"));
    }
    let mut addresses: Vec<&str> = Vec::new();
    if spec["type"] == "LoadBalancer" {
        for ingress in service["status"]["loadBalancer"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
        {
            addresses.extend(ingress["ip"].as_str().or(ingress["hostname"].as_str()));
        }
    }
    addresses.extend(strings(&spec["externalIPs"]));
    match addresses.is_empty() {
        false => addresses.join(","),
        true if spec["type"] == "LoadBalancer" => "<pending>".into(),
        true => "<none>".into(),
    }
}

/// kubectl's PORT(S): `8080/TCP,80:30080/TCP` (`port:nodePort` when there is a node port).
fn service_ports(service: &Value) -> String {
    let ports: Vec<String> = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let protocol = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_u64() {
                Some(node) => format!("{}:{node}/{protocol}", p["port"]),
                None => format!("{}/{protocol}", p["port"]),
            }
        })
        .collect();
    if ports.is_empty() {
        "<none>".into()
    } else {
        ports.join(",")
    }
}

/// kubectl's SELECTOR (`-o wide`): `app=payment,version=v1`.
fn service_selector(service: &Value) -> String {
    let pairs: Vec<String> = service["spec"]["selector"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    if pairs.is_empty() {
        "<none>".into()
    } else {
        pairs.join(",")
    }
}

/// kubectl's PORTS of an EndpointSlice: `8080,9090`, `<unset>` for none.
fn slice_ports(slice: &Value) -> String {
    let ports: Vec<String> = slice["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["port"].to_string())
        .collect();
    if ports.is_empty() {
        "<unset>".into()
    } else {
        ports.join(",")
    }
}

/// kubectl's ENDPOINTS of an EndpointSlice: the first three addresses, then how many more.
fn slice_endpoints(slice: &Value) -> String {
    const SHOWN: usize = 3;
    let all: Vec<&str> = slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| strings(&e["addresses"]))
        .collect();
    match all.len() {
        0 => "<unset>".into(),
        n if n <= SHOWN => all.join(","),
        n => format!("{} + {} more...", all[..SHOWN].join(","), n - SHOWN),
    }
}

/// kubectl's ENDPOINTS: the first three ready `ip:port`s, then how many more.
fn endpoints_summary(endpoints: &Value) -> String {
    const SHOWN: usize = 3;
    let subsets = endpoints["subsets"].as_array().into_iter().flatten();
    let mut all: Vec<String> = Vec::new();
    for subset in subsets {
        let ips: Vec<&str> = subset["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["ip"].as_str())
            .collect();
        match subset["ports"].as_array().filter(|p| !p.is_empty()) {
            None => all.extend(ips.iter().map(|ip| ip.to_string())),
            Some(ports) => {
                for port in ports {
                    for ip in &ips {
                        all.push(match ip.contains(':') {
                            true => format!("[{ip}]:{}", port["port"]),
                            false => format!("{ip}:{}", port["port"]),
                        });
                    }
                }
            }
        }
    }
    match all.len() {
        0 => "<none>".into(),
        n if n <= SHOWN => all.join(","),
        n => format!("{} + {} more...", all[..SHOWN].join(","), n - SHOWN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(kind: &str) -> Vec<&'static str> {
        let info = crate::kind_for(kind)
            .or_else(|| crate::view_for(kind))
            .unwrap();
        columns(info)
            .iter()
            .filter(|c| c.priority == 0)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn istio_kinds_show_their_crds_printer_columns_in_order() {
        assert_eq!(headers("we"), ["AGE", "ADDRESS"]);
        assert_eq!(headers("se"), ["HOSTS", "LOCATION", "RESOLUTION", "AGE"]);
        assert_eq!(headers("vs"), ["GATEWAYS", "HOSTS", "AGE"]);
        assert_eq!(headers("dr"), ["HOST", "AGE"]);
        assert_eq!(headers("wg"), ["AGE"]);
        assert_eq!(headers("gw"), ["AGE"]);
        assert_eq!(headers("pa"), ["MODE", "AGE"]);
        assert_eq!(headers("ap"), ["ACTION", "AGE"]);
        assert_eq!(headers("ns"), ["STATUS", "AGE"]);
        assert_eq!(
            headers("svc"),
            ["TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
        );
        assert_eq!(headers("ep"), ["ENDPOINTS", "AGE"]);
        assert_eq!(
            headers("endpointslices"),
            ["ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]
        );
    }

    #[test]
    fn rows_hold_each_columns_cell() {
        let info = crate::kind_for("svc").unwrap();
        let service = json!({"metadata": {"name": "payment", "creationTimestamp": "2026-12-05T10:00:00Z"},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.5", "selector": {"app": "payment"},
                     "ports": [{"port": 8080}, {"port": 9090, "protocol": "TCP"}]}});
        let now = parse_rfc3339("2026-12-05T13:00:00Z").unwrap();
        assert_eq!(
            row(&columns(info), &service, now),
            [
                "payment",
                "ClusterIP",
                "10.96.0.5",
                "<none>",
                "8080/TCP,9090/TCP",
                "3h",
                "app=payment"
            ]
        );
    }

    #[test]
    fn timestamps_parse_as_the_store_writes_them() {
        let epoch = SystemTime::UNIX_EPOCH;
        let at = |t| {
            parse_rfc3339(t)
                .unwrap()
                .duration_since(epoch)
                .unwrap()
                .as_secs()
        };
        assert_eq!(at("1970-01-01T00:00:00Z"), 0);
        assert_eq!(at("2000-03-01T00:00:01Z"), 951_868_801);
        assert_eq!(at("2026-12-05T10:16:04.123Z"), 1_796_465_764);
        assert!(parse_rfc3339("yesterday").is_none());
    }
}
