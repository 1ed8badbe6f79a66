//! Istio `DestinationRule`: what happens to traffic for a host after routing —
//! subsets, load balancing, connection pools, outlier detection, TLS.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::common::{
    Duration, MatchLabelsSelector, NETWORKING_VERSIONS, PortSelector, SpecValidate, WithSpec,
    check_export_to,
};
use super::workload_entry::check_locality;
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Option<Vec<Subset>>,
    pub export_to: Option<Vec<String>>,
    pub workload_selector: Option<MatchLabelsSelector>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
    pub port_level_settings: Option<Vec<PortTrafficPolicy>>,
    pub tunnel: Option<serde_json::Value>,
    pub proxy_protocol: Option<serde_json::Value>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    pub labels: Option<BTreeMap<String, String>>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSettings {
    pub simple: Option<SimpleLb>,
    pub consistent_hash: Option<ConsistentHashLb>,
    pub locality_lb_setting: Option<LocalityLbSetting>,
    pub warmup_duration_secs: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    Unspecified,
    LeastConn,
    Random,
    Passthrough,
    RoundRobin,
    LeastRequest,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHashLb {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub ring_hash: Option<RingHash>,
    pub maglev: Option<Maglev>,
    pub minimum_ring_size: Option<u64>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCookie {
    pub name: String,
    pub path: Option<String>,
    pub ttl: Option<Duration>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RingHash {
    pub minimum_ring_size: Option<u64>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Maglev {
    pub table_size: Option<u64>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityLbSetting {
    pub distribute: Option<Vec<LocalityDistribute>>,
    pub failover: Option<Vec<LocalityFailover>>,
    pub failover_priority: Option<Vec<String>>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityDistribute {
    pub from: String,
    pub to: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityFailover {
    pub from: String,
    pub to: String,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSettings {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSettings {
    pub max_connections: Option<i32>,
    pub connect_timeout: Option<Duration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub max_connection_duration: Option<Duration>,
    pub idle_timeout: Option<Duration>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSettings {
    pub http1_max_pending_requests: Option<i32>,
    pub http2_max_requests: Option<i32>,
    pub max_requests_per_connection: Option<i32>,
    pub max_retries: Option<i32>,
    pub idle_timeout: Option<Duration>,
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    pub use_client_protocol: Option<bool>,
    pub max_concurrent_streams: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    Default,
    DoNotUpgrade,
    Upgrade,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    pub split_external_local_origin_errors: Option<bool>,
    pub consecutive_local_origin_failures: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<i32>,
    pub min_health_percent: Option<i32>,
    pub consecutive_errors: Option<i32>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTlsSettings {
    pub mode: Option<ClientTlsMode>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub ca_crl: Option<String>,
    pub credential_name: Option<String>,
    pub subject_alt_names: Option<Vec<String>>,
    pub sni: Option<String>,
    pub insecure_skip_verify: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientTlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

impl TrafficPolicy {
    fn validate(&self, c: &mut Checker, path: &Path, allow_port_level: bool) {
        check_settings(
            c,
            path,
            (
                &self.load_balancer,
                &self.connection_pool,
                &self.outlier_detection,
                &self.tls,
            ),
        );
        let ports = self.port_level_settings.as_deref().unwrap_or_default();
        if !allow_port_level && !ports.is_empty() {
            c.error(
                &path.f("portLevelSettings"),
                "portLevelSettings is not allowed here",
            );
        }
        for (i, port) in ports.iter().enumerate() {
            let p = path.f("portLevelSettings").i(i);
            match &port.port {
                Some(selector) => c.port(&p.f("port").f("number"), selector.number),
                None => c.error(&p.f("port"), "port is required"),
            }
            check_settings(
                c,
                &p,
                (
                    &port.load_balancer,
                    &port.connection_pool,
                    &port.outlier_detection,
                    &port.tls,
                ),
            );
        }
        let numbers: Vec<(usize, String)> = ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, p.port.as_ref()?.number.to_string())))
            .collect();
        c.unique_names(
            &path.f("portLevelSettings"),
            "port.number",
            "port",
            numbers.iter().map(|(i, n)| (*i, n.as_str())),
        );
    }
}

#[allow(clippy::type_complexity)]
fn check_settings(
    c: &mut Checker,
    path: &Path,
    (lb, pool, outlier, tls): (
        &Option<LoadBalancerSettings>,
        &Option<ConnectionPoolSettings>,
        &Option<OutlierDetection>,
        &Option<ClientTlsSettings>,
    ),
) {
    if let Some(lb) = lb {
        lb.validate(c, &path.f("loadBalancer"));
    }
    if let Some(pool) = pool {
        pool.validate(c, &path.f("connectionPool"));
    }
    if let Some(outlier) = outlier {
        outlier.validate(c, &path.f("outlierDetection"));
    }
    if let Some(tls) = tls {
        tls.validate(c, &path.f("tls"));
    }
}

impl LoadBalancerSettings {
    fn validate(&self, c: &mut Checker, path: &Path) {
        c.one_of(
            path,
            &[
                ("simple", self.simple.is_some()),
                ("consistentHash", self.consistent_hash.is_some()),
            ],
            false,
        );
        if let Some(hash) = &self.consistent_hash {
            let p = path.f("consistentHash");
            c.one_of(
                &p,
                &[
                    ("httpHeaderName", hash.http_header_name.is_some()),
                    ("httpCookie", hash.http_cookie.is_some()),
                    ("useSourceIp", hash.use_source_ip.is_some()),
                    (
                        "httpQueryParameterName",
                        hash.http_query_parameter_name.is_some(),
                    ),
                ],
                true,
            );
            c.one_of(
                &p,
                &[
                    ("ringHash", hash.ring_hash.is_some()),
                    ("maglev", hash.maglev.is_some()),
                ],
                false,
            );
            if let Some(cookie) = &hash.http_cookie
                && cookie.name.is_empty()
            {
                c.error(&p.f("httpCookie").f("name"), "cookie name is required");
            }
        }
        const NOT_APPLIED: &str = "accepted but not applied by vmesh yet";
        if self.warmup_duration_secs.is_some() {
            c.warn(&path.f("warmupDurationSecs"), NOT_APPLIED);
        }
        if let Some(locality) = &self.locality_lb_setting {
            let p = path.f("localityLbSetting");
            if locality.distribute.as_ref().is_some_and(|d| !d.is_empty()) {
                c.warn(&p.f("distribute"), NOT_APPLIED);
            }
            if locality
                .failover_priority
                .as_ref()
                .is_some_and(|f| !f.is_empty())
            {
                c.warn(&p.f("failoverPriority"), NOT_APPLIED);
            }
            let distribute = locality.distribute.as_deref().unwrap_or_default();
            let failover = locality.failover.as_deref().unwrap_or_default();
            c.one_of(
                &p,
                &[
                    ("distribute", !distribute.is_empty()),
                    ("failover", !failover.is_empty()),
                ],
                false,
            );
            for (i, d) in distribute.iter().enumerate() {
                let dp = p.f("distribute").i(i);
                check_locality_pattern(c, &dp.f("from"), &d.from);
                let total: u32 = d.to.values().sum();
                if total != 100 {
                    c.error(&dp.f("to"), format!("weights must sum to 100, not {total}"));
                }
                for to in d.to.keys() {
                    check_locality_pattern(c, &dp.f("to").f(to), to);
                }
            }
            for (i, f) in failover.iter().enumerate() {
                let fp = p.f("failover").i(i);
                if f.from == f.to {
                    c.error(
                        &fp,
                        format!("failover from and to are the same region {:?}", f.from),
                    );
                }
                for (field, region) in [("from", &f.from), ("to", &f.to)] {
                    if region.is_empty() || region.contains('/') || region.contains('*') {
                        c.error(
                            &fp.f(field),
                            format!(
                                "{region:?} must be a region name (failover is between regions)"
                            ),
                        );
                    }
                }
            }
        }
    }
}

/// A locality pattern in `distribute`: `region/zone/subzone` where any part may be `*`.
fn check_locality_pattern(c: &mut Checker, path: &Path, pattern: &str) {
    if pattern == "*" {
        return;
    }
    let stripped = pattern.trim_end_matches("/*");
    if stripped != pattern && !stripped.contains('*') {
        return;
    }
    check_locality(c, path, pattern);
}

impl ConnectionPoolSettings {
    fn validate(&self, c: &mut Checker, path: &Path) {
        if let Some(tcp) = &self.tcp {
            let p = path.f("tcp");
            if tcp.max_connections.is_some_and(|n| n < 0) {
                c.error(&p.f("maxConnections"), "must not be negative");
            }
            if let Some(t) = &tcp.connect_timeout {
                t.check_at_least_ms(c, &p.f("connectTimeout"));
            }
            if let Some(keepalive) = &tcp.tcp_keepalive {
                for (field, d) in [("time", &keepalive.time), ("interval", &keepalive.interval)] {
                    if let Some(d) = d {
                        d.check_at_least_ms(c, &p.f("tcpKeepalive").f(field));
                    }
                }
            }
        }
        if let Some(http) = &self.http {
            let p = path.f("http");
            for (field, value) in [
                ("http1MaxPendingRequests", http.http1_max_pending_requests),
                ("http2MaxRequests", http.http2_max_requests),
                ("maxRequestsPerConnection", http.max_requests_per_connection),
                ("maxRetries", http.max_retries),
                ("maxConcurrentStreams", http.max_concurrent_streams),
            ] {
                if value.is_some_and(|n| n < 0) {
                    c.error(&p.f(field), "must not be negative");
                }
            }
            if let Some(t) = &http.idle_timeout {
                t.check_at_least_ms(c, &p.f("idleTimeout"));
            }
        }
    }
}

impl OutlierDetection {
    fn validate(&self, c: &mut Checker, path: &Path) {
        for (field, value) in [
            ("maxEjectionPercent", self.max_ejection_percent),
            ("minHealthPercent", self.min_health_percent),
        ] {
            if let Some(v) = value {
                c.percentage(&path.f(field), v.into());
            }
        }
        if self.consecutive_errors.is_some_and(|n| n < 0) {
            c.error(&path.f("consecutiveErrors"), "must not be negative");
        }
        for (field, d) in [
            ("interval", &self.interval),
            ("baseEjectionTime", &self.base_ejection_time),
        ] {
            if let Some(d) = d {
                d.check_at_least_ms(c, &path.f(field));
            }
        }
    }
}

impl ClientTlsSettings {
    fn validate(&self, c: &mut Checker, path: &Path) {
        let mode = self.mode.unwrap_or(ClientTlsMode::Disable);
        let has_files = self.client_certificate.is_some() || self.private_key.is_some();
        match mode {
            ClientTlsMode::Mutual if self.credential_name.is_none() => {
                if self.client_certificate.is_none() {
                    c.error(
                        &path.f("clientCertificate"),
                        "clientCertificate is required for mode MUTUAL",
                    );
                }
                if self.private_key.is_none() {
                    c.error(
                        &path.f("privateKey"),
                        "privateKey is required for mode MUTUAL",
                    );
                }
            }
            ClientTlsMode::IstioMutual | ClientTlsMode::Disable
                if has_files
                    || self.ca_certificates.is_some()
                    || self.credential_name.is_some() =>
            {
                c.error(path, "certificates cannot be set with mode ISTIO_MUTUAL or DISABLE: the mesh supplies them");
            }
            _ => {}
        }
    }
}

impl SpecValidate for DestinationRuleSpec {
    fn validate(&self, c: &mut Checker, path: &Path) {
        if self.host.is_empty() {
            c.error(&path.f("host"), "host is required");
        } else {
            c.hostname(&path.f("host"), &self.host);
        }
        if let Some(policy) = &self.traffic_policy {
            policy.validate(c, &path.f("trafficPolicy"), true);
        }
        let subsets = self.subsets.as_deref().unwrap_or_default();
        for (i, subset) in subsets.iter().enumerate() {
            let p = path.f("subsets").i(i);
            if subset.name.is_empty() {
                c.error(&p.f("name"), "subset name is required");
            } else {
                c.dns1123_label(&p.f("name"), &subset.name);
            }
            if let Some(labels) = &subset.labels {
                super::common::check_selector_labels(c, &p.f("labels"), labels);
            }
            if let Some(policy) = &subset.traffic_policy {
                policy.validate(c, &p.f("trafficPolicy"), true);
            }
        }
        c.unique_names(
            &path.f("subsets"),
            "name",
            "subset name",
            subsets
                .iter()
                .enumerate()
                .map(|(i, s)| (i, s.name.as_str())),
        );
        if let Some(export_to) = &self.export_to {
            check_export_to(c, &path.f("exportTo"), export_to);
        }
        if let Some(selector) = &self.workload_selector {
            selector.validate(c, &path.f("workloadSelector"));
            c.warn(
                &path.f("workloadSelector"),
                "accepted but not applied by vmesh yet: the rule applies to every client in scope",
            );
        }
    }
}

pub type DestinationRule = WithSpec<DestinationRuleSpec>;

pub static KIND: KindInfo = KindInfo {
    kind: "DestinationRule",
    group: "networking.istio.io",
    versions: NETWORKING_VERSIONS,
    plural: "destinationrules",
    short_names: &["dr"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[("HOST", "/spec/host")],
    decode: decode_body::<DestinationRule>,
    schema: body_schema::<DestinationRule>,
};
