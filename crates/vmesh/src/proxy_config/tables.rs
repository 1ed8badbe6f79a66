//! istioctl's proxy-config tables, read from an Envoy config dump in
//! Envoy's JSON (the server's `/debug/config_dump` or Envoy's own admin),
//! and from Envoy's `/clusters?format=json` for endpoints as Envoy sees
//! them. Same columns, filters, sort orders and cell texts as istioctl's
//! `configdump` and `clusters` writers; nothing here does I/O.

use serde_json::Value;

use crate::output::align;

/// The section of `dump` whose `@type` is `….kind` (`ClustersConfigDump`, …).
pub fn section<'a>(dump: &'a Value, kind: &str) -> Option<&'a Value> {
    dump["configs"]
        .as_array()?
        .iter()
        .find(|c| c["@type"].as_str().and_then(|t| t.rsplit('.').next()) == Some(kind))
}

/// The resources of the dump's `kind` section that `keep` admits: for each
/// `(list, path)`, the value at `path` in every item of `section[list]`
/// (`["active_state", "listener"]` for a dynamic listener).
fn listed<'a>(
    dump: &'a Value,
    kind: &str,
    lists: &[(&str, &[&str])],
    keep: impl Fn(&Value) -> bool,
) -> Vec<&'a Value> {
    let Some(section) = section(dump, kind) else {
        return Vec::new();
    };
    lists
        .iter()
        .flat_map(|(list, path)| {
            section[*list]
                .as_array()
                .into_iter()
                .flatten()
                .map(|item| path.iter().fold(item, |v, key| &v[*key]))
        })
        .filter(|found| !found.is_null() && keep(found))
        .collect()
}

fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// A number Envoy's JSON writes as a number or (64-bit) as a string.
fn number(value: &Value) -> u64 {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

// ---- clusters ----

/// `--fqdn`, `--port`, `--subset`, `--direction`: substrings of the
/// cluster's name, as istioctl matches them.
#[derive(Debug, Clone, Default)]
pub struct ClusterFilter {
    pub fqdn: Option<String>,
    pub port: Option<u16>,
    pub subset: Option<String>,
    pub direction: Option<String>,
}

impl ClusterFilter {
    fn admits(&self, name: &str) -> bool {
        let has = |part: &Option<String>| part.as_ref().is_none_or(|p| name.contains(p.as_str()));
        has(&self.fqdn)
            && has(&self.direction)
            && has(&self.subset)
            && self
                .port
                .is_none_or(|port| name.contains(&format!("|{port}|")))
    }
}

/// `direction|port|subset|fqdn` of an Istio cluster name, or the name as
/// the FQDN for any other (istioctl's `safelyParseSubsetKey`).
fn subset_key(name: &str) -> (&str, u16, &str, &str) {
    let parts: Vec<&str> = name.split('|').collect();
    match parts.as_slice() {
        [direction, port, subset, fqdn, ..] => {
            (*direction, port.parse().unwrap_or(0), *subset, *fqdn)
        }
        _ => ("", 0, "", name),
    }
}

/// Sorted as istioctl sorts clusters and load assignments: by FQDN, subset,
/// port, direction.
fn by_subset_key<'a>(items: &mut [&'a Value], name: impl Fn(&'a Value) -> &'a str) {
    items.sort_by(|a, b| {
        let ((ad, ap, asub, afqdn), (bd, bp, bsub, bfqdn)) =
            (subset_key(name(a)), subset_key(name(b)));
        (afqdn, asub, ap, ad).cmp(&(bfqdn, bsub, bp, bd))
    });
}

/// Every cluster of the dump (dynamic active, then static) that `filter`
/// admits, in istioctl's order.
pub fn clusters<'a>(dump: &'a Value, filter: &ClusterFilter) -> Vec<&'a Value> {
    let mut clusters = listed(
        dump,
        "ClustersConfigDump",
        &[
            ("dynamic_active_clusters", &["cluster"]),
            ("static_clusters", &["cluster"]),
        ],
        |c| filter.admits(str_of(&c["name"])),
    );
    by_subset_key(&mut clusters, |c| str_of(&c["name"]));
    clusters
}

/// `name.namespace` of the Istio config an Envoy resource came from
/// (`metadata.filter_metadata.istio.config`), as istioctl's
/// `describeManagement` shows it.
fn management(metadata: &Value) -> String {
    let Some(config) = metadata["filter_metadata"]["istio"]["config"].as_str() else {
        return String::new();
    };
    if !config.starts_with("/apis/networking.istio.io/") {
        return "<unknown>".into();
    }
    match config.split('/').collect::<Vec<_>>().as_slice() {
        [_, _, _, _, _, namespace, _, name] => format!("{name}.{namespace}"),
        _ => String::new(),
    }
}

pub fn cluster_table(clusters: &[&Value]) -> String {
    let rows: Vec<Vec<String>> = clusters
        .iter()
        .map(|c| {
            let name = str_of(&c["name"]);
            // Envoy leaves the default (STATIC) out of its JSON.
            let kind = c["type"].as_str().unwrap_or("STATIC").to_string();
            let rule = management(&c["metadata"]);
            if name.split('|').count() > 3 {
                let (direction, port, subset, fqdn) = subset_key(name);
                let subset = if subset.is_empty() { "-" } else { subset };
                [fqdn, &port.to_string(), subset, direction, &kind, &rule]
                    .map(str::to_string)
                    .to_vec()
            } else {
                [name, "-", "-", "-", &kind, &rule]
                    .map(str::to_string)
                    .to_vec()
            }
        })
        .collect();
    align(
        &[
            "SERVICE FQDN",
            "PORT",
            "SUBSET",
            "DIRECTION",
            "TYPE",
            "DESTINATION RULE",
        ],
        &rows,
    )
}

// ---- listeners ----

const HTTP_CONNECTION_MANAGER: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const BLACKHOLE: &str = "BlackHoleCluster";
const PASSTHROUGH: &str = "PassthroughCluster";

/// `--address`, `--port`, `--type` (HTTP, TCP, HTTP+TCP, UNKNOWN).
#[derive(Debug, Clone, Default)]
pub struct ListenerFilter {
    pub address: Option<String>,
    pub port: Option<u16>,
    pub kind: Option<String>,
}

impl ListenerFilter {
    fn admits(&self, listener: &Value) -> bool {
        self.address.as_ref().is_none_or(|wanted| {
            listener_addresses(listener)
                .iter()
                .any(|a| a.eq_ignore_ascii_case(wanted))
        }) && self
            .port
            .is_none_or(|port| listener_port(listener) == u64::from(port))
            && self
                .kind
                .as_ref()
                .is_none_or(|kind| listener_type(listener).eq_ignore_ascii_case(kind))
    }
}

fn listener_addresses(listener: &Value) -> Vec<String> {
    let address = &listener["address"];
    let main = address["socket_address"]["address"]
        .as_str()
        .or(address["pipe"]["path"].as_str())
        .unwrap_or_default()
        .to_string();
    let mut addresses = vec![main];
    addresses.extend(
        listener["additional_addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| str_of(&a["address"]["socket_address"]["address"]).to_string()),
    );
    addresses
}

fn listener_port(listener: &Value) -> u64 {
    number(&listener["address"]["socket_address"]["port_value"])
}

fn filter_chains(listener: &Value) -> Vec<&Value> {
    let mut chains: Vec<&Value> = listener["filter_chains"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    if !listener["default_filter_chain"].is_null() {
        chains.push(&listener["default_filter_chain"]);
    }
    chains
}

fn filters(chain: &Value) -> impl Iterator<Item = &Value> {
    chain["filters"].as_array().into_iter().flatten()
}

/// A TCP proxy to the blackhole is no TCP destination (istioctl looks for
/// the name anywhere in its config).
fn is_blackhole(filter: &Value) -> bool {
    filter["typed_config"].to_string().contains(BLACKHOLE)
}

/// HTTP, TCP, HTTP+TCP or UNKNOWN, by the filters of every chain.
fn listener_type(listener: &Value) -> &'static str {
    let (mut http, mut tcp) = (0, 0);
    for filter in filter_chains(listener).into_iter().flat_map(filters) {
        match str_of(&filter["name"]) {
            HTTP_CONNECTION_MANAGER => http += 1,
            TCP_PROXY if !is_blackhole(filter) => tcp += 1,
            _ => {}
        }
    }
    match (http > 0, tcp > 0) {
        (true, false) => "HTTP",
        (true, true) => "HTTP+TCP",
        (false, true) => "TCP",
        (false, false) => "UNKNOWN",
    }
}

/// Every listener (dynamic active, then static) `filter` admits, sorted by
/// port, address and type.
pub fn listeners<'a>(dump: &'a Value, filter: &ListenerFilter) -> Vec<&'a Value> {
    let mut listeners = listed(
        dump,
        "ListenersConfigDump",
        &[
            ("dynamic_listeners", &["active_state", "listener"]),
            ("static_listeners", &["listener"]),
        ],
        |l| filter.admits(l),
    );
    listeners.sort_by(|a, b| {
        (
            listener_port(a),
            listener_addresses(a)[0].clone(),
            listener_type(a),
        )
            .cmp(&(
                listener_port(b),
                listener_addresses(b)[0].clone(),
                listener_type(b),
            ))
    });
    listeners
}

/// The application protocols istioctl names.
const KNOWN_ALPNS: [(&str, &[&str]); 4] = [
    (
        "App: HTTP TLS",
        &[
            "http/1.0",
            "http/1.1",
            "h2c",
            "istio-http/1.0",
            "istio-http/1.1",
            "istio-h2",
        ],
    ),
    (
        "App: Istio HTTP Plain",
        &["istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"],
    ),
    ("App: TCP TLS", &["istio-peer-exchange", "istio"]),
    ("App: HTTP", &["http/1.0", "http/1.1", "h2c"]),
];

/// istioctl's MATCH cell for a filter chain match.
fn chain_match(matcher: &Value) -> String {
    let mut parts = Vec::new();
    let server_names = strings(&matcher["server_names"]);
    if !server_names.is_empty() {
        parts.push(format!("SNI: {}", server_names.join(",")));
    }
    if let Some(transport) = matcher["transport_protocol"]
        .as_str()
        .filter(|t| !t.is_empty())
    {
        parts.push(format!("Trans: {transport}"));
    }
    let alpns = strings(&matcher["application_protocols"]);
    if !alpns.is_empty() {
        parts.push(
            KNOWN_ALPNS
                .iter()
                .find(|(_, known)| *known == alpns.as_slice())
                .map_or_else(
                    || format!("App: {}", alpns.join(",")),
                    |(name, _)| name.to_string(),
                ),
        );
    }
    let port = if matcher["destination_port"].is_null() {
        String::new()
    } else {
        format!(":{}", number(&matcher["destination_port"]))
    };
    let prefixes: Vec<String> = matcher["prefix_ranges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{}/{}",
                str_of(&p["address_prefix"]),
                number(&p["prefix_len"])
            )
        })
        .collect();
    if !prefixes.is_empty() {
        parts.push(format!("Addr: {}{port}", prefixes.join(",")));
    } else if !port.is_empty() {
        parts.push(format!("Addr: *{port}"));
    }
    if parts.is_empty() {
        "ALL".into()
    } else {
        parts.join("; ")
    }
}

/// `Cluster: NAME`, or the name alone for Istio's own clusters.
fn cluster_cell(cluster: &str) -> String {
    if cluster.contains("Cluster") {
        cluster.to_string()
    } else {
        format!("Cluster: {cluster}")
    }
}

/// istioctl's DESTINATION cell for a chain's filters.
fn destination(chain: &Value) -> String {
    for filter in filters(chain) {
        let config = &filter["typed_config"];
        match str_of(&filter["name"]) {
            HTTP_CONNECTION_MANAGER => {
                if !config["route_config"].is_null() {
                    return describe_route_config(&config["route_config"]);
                }
                if let Some(name) = config["rds"]["route_config_name"]
                    .as_str()
                    .filter(|n| !n.is_empty())
                {
                    return format!("Route: {name}");
                }
                return "HTTP".into();
            }
            TCP_PROXY if !is_blackhole(filter) => return cluster_cell(str_of(&config["cluster"])),
            _ => {}
        }
    }
    "Non-HTTP/Non-TCP".into()
}

fn describe_route_config(routes: &Value) -> String {
    let hosts: Vec<&Value> = routes["virtual_hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    // One host for everything, one catch-all route to a cluster: the cluster.
    if let [host] = hosts.as_slice()
        && strings(&host["domains"]) == ["*"]
        && let Some([route]) = host["routes"].as_array().map(Vec::as_slice)
        && route["match"]["prefix"] == "/"
        && let Some(cluster) = route["route"]["cluster"].as_str()
    {
        return cluster_cell(cluster);
    }
    let described: Vec<String> = hosts
        .iter()
        .map(|host| {
            let domains = strings(&host["domains"]);
            let routes = host["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| route_match(&r["match"]))
                .collect::<Vec<_>>()
                .join(", ");
            if domains == ["*"] {
                routes
            } else {
                format!("{} {routes}", domains.join("/"))
            }
        })
        .collect();
    format!("Inline Route: {}", described.join("; "))
}

/// istioctl's MATCH cell for a route match (headers are not shown).
fn route_match(matcher: &Value) -> String {
    let mut conditions = Vec::new();
    if let Some(prefix) = matcher["prefix"].as_str().filter(|p| !p.is_empty()) {
        conditions.push(format!("{prefix}*"));
    }
    if let Some(prefix) = matcher["path_separated_prefix"]
        .as_str()
        .filter(|p| !p.is_empty())
    {
        conditions.push(format!("PathPrefix:{prefix}"));
    }
    if let Some(path) = matcher["path"].as_str().filter(|p| !p.is_empty()) {
        conditions.push(path.to_string());
    }
    if let Some(regex) = matcher["safe_regex"]["regex"].as_str() {
        conditions.push(format!("regex {regex}"));
    }
    conditions.join(" ")
}

/// ADDRESSES, PORT, MATCH, DESTINATION: one row per filter chain (istioctl's
/// verbose listener summary, its default).
pub fn listener_table(listeners: &[&Value]) -> String {
    let mut rows = Vec::new();
    for listener in listeners {
        let addresses = listener_addresses(listener).join(",");
        let port = listener_port(listener).to_string();
        let mut chains: Vec<(String, String)> = filter_chains(listener)
            .into_iter()
            .map(|chain| {
                (
                    chain_match(&chain["filter_chain_match"]),
                    destination(chain),
                )
            })
            .collect();
        chains.sort_by(|a, b| b.1.cmp(&a.1));
        rows.extend(
            chains
                .into_iter()
                .map(|(matched, to)| vec![addresses.clone(), port.clone(), matched, to]),
        );
    }
    align(&["ADDRESSES", "PORT", "MATCH", "DESTINATION"], &rows)
}

// ---- routes ----

/// Every route configuration (dynamic, then static) named `name` (all
/// without one), numeric names first in numeric order, as istioctl sorts.
pub fn routes<'a>(dump: &'a Value, name: Option<&str>) -> Vec<&'a Value> {
    let mut routes = listed(
        dump,
        "RoutesConfigDump",
        &[
            ("dynamic_route_configs", &["route_config"]),
            ("static_route_configs", &["route_config"]),
        ],
        |r| name.is_none_or(|name| str_of(&r["name"]) == name),
    );
    routes.sort_by_key(|r| {
        let number: Option<u64> = str_of(&r["name"]).parse().ok();
        (number.is_none(), number)
    });
    routes
}

/// istioctl's DOMAINS cell: one domain as it is; several, the shortest
/// names without ports (a name whose `.svc` or `.svc.cluster.local` form
/// is also there stands for it), at most two and a count of the rest.
fn route_domains(domains: &[&str]) -> String {
    match domains {
        [] => return String::new(),
        [one] => return one.to_string(),
        _ => {}
    }
    let without_port: Vec<&str> = domains
        .iter()
        .copied()
        .filter(|d| !d.contains(':') || (d.matches(':').count() > 2 && d.ends_with(']')))
        .collect();
    let shortened: Vec<&str> = without_port
        .iter()
        .copied()
        .filter(|d| {
            let shorter = |suffix: &str| {
                d.strip_suffix(suffix)
                    .is_some_and(|s| without_port.contains(&s))
            };
            !shorter(".svc.cluster.local") && !shorter(".svc")
        })
        .collect();
    if shortened.len() > 2 {
        format!(
            "{} + {} more...",
            shortened[..2].join(", "),
            shortened.len() - 2
        )
    } else {
        shortened.join(", ")
    }
}

/// NAME, VHOST NAME, DOMAINS, MATCH, VIRTUAL SERVICE: one row per route
/// (routes to the passthrough cluster left out), `/*` and `404` for a
/// virtual host without routes.
pub fn route_table(routes: &[&Value]) -> String {
    let mut rows = Vec::new();
    for config in routes {
        let name = str_of(&config["name"]);
        for host in config["virtual_hosts"].as_array().into_iter().flatten() {
            let domains = route_domains(&strings(&host["domains"]));
            let vhost = str_of(&host["name"]);
            let host_routes: Vec<&Value> =
                host["routes"].as_array().into_iter().flatten().collect();
            for route in &host_routes {
                if route["route"]["cluster"] == PASSTHROUGH {
                    continue;
                }
                rows.push(vec![
                    name.to_string(),
                    vhost.to_string(),
                    domains.clone(),
                    route_match(&route["match"]),
                    management(&route["metadata"]),
                ]);
            }
            if host_routes.is_empty() {
                rows.push(
                    [name, vhost, &domains, "/*", "404"]
                        .map(str::to_string)
                        .to_vec(),
                );
            }
        }
    }
    align(
        &["NAME", "VHOST NAME", "DOMAINS", "MATCH", "VIRTUAL SERVICE"],
        &rows,
    )
}

// ---- endpoints ----

/// `--address` (without port), `--port`, `--cluster`, `--status`
/// (HEALTHY, UNHEALTHY, …), compared without case.
#[derive(Debug, Clone, Default)]
pub struct EndpointFilter {
    pub address: Option<String>,
    pub port: Option<u16>,
    pub cluster: Option<String>,
    pub status: Option<String>,
}

/// One endpoint of one cluster, as the ENDPOINT table shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndpointRow {
    pub address: String,
    pub port: u64,
    pub cluster: String,
    pub status: String,
    /// `None` where the source does not know (the server's view).
    pub failed_outlier_check: Option<bool>,
}

impl EndpointFilter {
    fn admits(&self, row: &EndpointRow) -> bool {
        let same = |wanted: &Option<String>, value: &str| {
            wanted
                .as_ref()
                .is_none_or(|w| w.eq_ignore_ascii_case(value))
        };
        same(&self.address, &row.address)
            && self.port.is_none_or(|p| u64::from(p) == row.port)
            && same(&self.cluster, &row.cluster)
            && same(&self.status, &row.status)
    }
}

/// The address of an Envoy `Address`: IP (and port), `unix://` path, or
/// `envoy://` internal listener.
fn endpoint_address(address: &Value) -> (String, u64) {
    let socket = &address["socket_address"];
    if !socket.is_null() {
        return (
            str_of(&socket["address"]).to_string(),
            number(&socket["port_value"]),
        );
    }
    if let Some(path) = address["pipe"]["path"].as_str() {
        return (format!("unix://{path}"), 0);
    }
    let internal = &address["envoy_internal_address"];
    if let Some(listener) = internal["server_listener_name"].as_str() {
        return (
            format!("envoy://{listener}/{}", str_of(&internal["endpoint_id"])),
            0,
        );
    }
    ("unknown".into(), 0)
}

fn sorted(mut rows: Vec<EndpointRow>, filter: &EndpointFilter) -> Vec<EndpointRow> {
    rows.retain(|r| filter.admits(r));
    rows.sort();
    rows
}

/// Endpoints as Envoy runs them, from its `/clusters?format=json`.
pub fn endpoints_of_clusters(clusters: &Value, filter: &EndpointFilter) -> Vec<EndpointRow> {
    let mut rows = Vec::new();
    for cluster in clusters["cluster_statuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for host in cluster["host_statuses"].as_array().into_iter().flatten() {
            let (address, port) = endpoint_address(&host["address"]);
            let health = &host["health_status"];
            rows.push(EndpointRow {
                address,
                port,
                cluster: str_of(&cluster["name"]).to_string(),
                status: health["eds_health_status"]
                    .as_str()
                    .unwrap_or("UNKNOWN")
                    .to_string(),
                failed_outlier_check: Some(health["failed_outlier_check"] == true),
            });
        }
    }
    sorted(rows, filter)
}

/// The load assignments of a config dump (with EDS) that keep an endpoint
/// after `filter`, in istioctl's order.
pub fn load_assignments<'a>(dump: &'a Value, filter: &EndpointFilter) -> Vec<&'a Value> {
    let mut assignments = listed(
        dump,
        "EndpointsConfigDump",
        &[
            ("dynamic_endpoint_configs", &["endpoint_config"]),
            ("static_endpoint_configs", &["endpoint_config"]),
        ],
        |a| !assignment_rows(a, filter).is_empty(),
    );
    by_subset_key(&mut assignments, |a| str_of(&a["cluster_name"]));
    assignments
}

fn assignment_rows(assignment: &Value, filter: &EndpointFilter) -> Vec<EndpointRow> {
    let cluster = str_of(&assignment["cluster_name"]);
    let rows = assignment["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|locality| locality["lb_endpoints"].as_array().into_iter().flatten())
        .map(|endpoint| {
            let (address, port) = endpoint_address(&endpoint["endpoint"]["address"]);
            EndpointRow {
                address,
                port,
                cluster: cluster.to_string(),
                status: endpoint["health_status"]
                    .as_str()
                    .unwrap_or("UNKNOWN")
                    .to_string(),
                failed_outlier_check: None,
            }
        })
        .collect();
    sorted(rows, filter)
}

/// Endpoints as the server sent them, from a config dump with EDS.
pub fn endpoints_of_dump(dump: &Value, filter: &EndpointFilter) -> Vec<EndpointRow> {
    let rows = load_assignments(dump, filter)
        .into_iter()
        .flat_map(|a| assignment_rows(a, filter))
        .collect();
    sorted(rows, filter)
}

/// ENDPOINT, STATUS, OUTLIER CHECK, CLUSTER (istioctl's `endpoint`).
pub fn endpoint_table(rows: &[EndpointRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let endpoint = if r.port == 0 {
                r.address.clone()
            } else {
                format!("{}:{}", r.address, r.port)
            };
            let outlier = match r.failed_outlier_check {
                Some(true) => "FAILED",
                Some(false) => "OK",
                None => "-",
            };
            vec![
                endpoint,
                r.status.clone(),
                outlier.to_string(),
                r.cluster.clone(),
            ]
        })
        .collect();
    align(&["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER"], &rows)
}

#[cfg(test)]
#[path = "tables/tests.rs"]
mod tests;
