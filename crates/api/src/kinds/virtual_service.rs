//! Istio `VirtualService`: how requests for a host are routed — HTTP matches,
//! weighted destinations, retries, timeouts, rewrites, faults, mirrors — and
//! TLS/TCP routes by port and SNI.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::common::{
    Duration, NETWORKING_VERSIONS, Percent, PortSelector, SpecValidate, StringMatch, WithSpec,
    check_export_to,
};
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    pub hosts: Option<Vec<String>>,
    pub gateways: Option<Vec<String>>,
    pub http: Option<Vec<HttpRoute>>,
    pub tls: Option<Vec<TlsRoute>>,
    pub tcp: Option<Vec<TcpRoute>>,
    pub export_to: Option<Vec<String>>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Option<Vec<HttpMatchRequest>>,
    pub route: Option<Vec<HttpRouteDestination>>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub delegate: Option<Delegate>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<Duration>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFaultInjection>,
    pub mirror: Option<Destination>,
    pub mirror_percentage: Option<Percent>,
    pub mirror_percent: Option<u32>,
    pub mirrors: Option<Vec<HttpMirrorPolicy>>,
    pub cors_policy: Option<CorsPolicy>,
    pub headers: Option<Headers>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: Option<BTreeMap<String, StringMatch>>,
    pub port: Option<u32>,
    pub source_labels: Option<BTreeMap<String, String>>,
    pub gateways: Option<Vec<String>>,
    pub query_params: Option<BTreeMap<String, StringMatch>>,
    pub ignore_uri_case: Option<bool>,
    pub without_headers: Option<BTreeMap<String, StringMatch>>,
    pub source_namespace: Option<String>,
    pub stat_prefix: Option<String>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteDestination {
    pub destination: Destination,
    pub weight: Option<i32>,
    pub headers: Option<Headers>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<i32>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    pub set: Option<BTreeMap<String, String>>,
    pub add: Option<BTreeMap<String, String>>,
    pub remove: Option<Vec<String>>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u32>,
    pub derive_port: Option<String>,
    pub scheme: Option<String>,
    pub redirect_code: Option<u32>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpDirectResponse {
    pub status: u32,
    pub body: Option<HttpBody>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBody {
    pub string: Option<String>,
    pub bytes: Option<String>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delegate {
    pub name: String,
    pub namespace: Option<String>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetry {
    pub attempts: Option<i32>,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<bool>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFaultInjection {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    pub fixed_delay: Option<Duration>,
    pub exponential_delay: Option<Duration>,
    pub percentage: Option<Percent>,
    pub percent: Option<i32>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    pub http_status: Option<i32>,
    pub grpc_status: Option<String>,
    pub http2_error: Option<String>,
    pub percentage: Option<Percent>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    pub percentage: Option<Percent>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsPolicy {
    pub allow_origins: Option<Vec<StringMatch>>,
    pub allow_origin: Option<Vec<String>>,
    pub allow_methods: Option<Vec<String>>,
    pub allow_headers: Option<Vec<String>>,
    pub expose_headers: Option<Vec<String>>,
    pub max_age: Option<Duration>,
    pub allow_credentials: Option<bool>,
    pub unmatched_preflights: Option<String>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsRoute {
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatchAttributes>,
    pub route: Option<Vec<RouteDestination>>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsMatchAttributes {
    pub sni_hosts: Vec<String>,
    pub destination_subnets: Option<Vec<String>>,
    pub port: Option<u32>,
    pub source_labels: Option<BTreeMap<String, String>>,
    pub gateways: Option<Vec<String>>,
    pub source_namespace: Option<String>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    #[serde(rename = "match")]
    pub matches: Option<Vec<L4MatchAttributes>>,
    pub route: Option<Vec<RouteDestination>>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4MatchAttributes {
    pub destination_subnets: Option<Vec<String>>,
    pub port: Option<u32>,
    pub source_labels: Option<BTreeMap<String, String>>,
    pub gateways: Option<Vec<String>>,
    pub source_namespace: Option<String>,
}

/// Envoy's retry conditions that Istio passes through in `retryOn`.
const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

impl Destination {
    fn validate(&self, c: &mut Checker, path: &Path) {
        if self.host.is_empty() {
            c.error(&path.f("host"), "destination host is required");
        } else {
            c.hostname(&path.f("host"), &self.host);
        }
        if let Some(subset) = &self.subset {
            c.dns1123_label(&path.f("subset"), subset);
        }
        if let Some(port) = &self.port {
            c.port(&path.f("port").f("number"), port.number);
        }
    }
}

/// Weights of a route's destinations: with more than one destination they sum to 100.
fn check_weights(c: &mut Checker, path: &Path, weights: &[Option<i32>]) {
    for (i, w) in weights.iter().enumerate() {
        if w.is_some_and(|w| w < 0) {
            c.error(&path.i(i).f("weight"), "weight must not be negative");
        }
    }
    if weights.len() > 1 {
        let total: i64 = weights.iter().map(|w| i64::from(w.unwrap_or(0))).sum();
        if total != 100 {
            c.error(
                path,
                format!("route weights must sum to 100, but they sum to {total}"),
            );
        }
    }
}

fn check_percent(c: &mut Checker, path: &Path, percent: &Option<Percent>) {
    if let Some(p) = percent {
        c.percentage(&path.f("value"), p.value);
    }
}

impl HttpRoute {
    fn validate(&self, c: &mut Checker, path: &Path) {
        let routes = self.route.as_deref().unwrap_or_default();
        c.one_of(
            path,
            &[
                ("route", !routes.is_empty()),
                ("redirect", self.redirect.is_some()),
                ("directResponse", self.direct_response.is_some()),
                ("delegate", self.delegate.is_some()),
            ],
            true,
        );
        for (i, m) in self.matches.iter().flatten().enumerate() {
            let p = path.f("match").i(i);
            for (field, sm) in [
                ("uri", &m.uri),
                ("scheme", &m.scheme),
                ("method", &m.method),
                ("authority", &m.authority),
            ] {
                if let Some(sm) = sm {
                    sm.validate(c, &p.f(field));
                }
            }
            for (field, map) in [
                ("headers", &m.headers),
                ("queryParams", &m.query_params),
                ("withoutHeaders", &m.without_headers),
            ] {
                for (name, sm) in map.iter().flatten() {
                    if field != "queryParams" && name.chars().any(|ch| ch.is_ascii_uppercase()) {
                        c.error(
                            &p.f(field).f(name),
                            format!("header name {name:?} must be lower case"),
                        );
                    }
                    if sm != &StringMatch::default() {
                        sm.validate(c, &p.f(field).f(name));
                    }
                }
            }
            if let Some(port) = m.port {
                c.port(&p.f("port"), port);
            }
            if let Some(labels) = &m.source_labels {
                c.labels(&p.f("sourceLabels"), labels);
            }
        }
        for (i, r) in routes.iter().enumerate() {
            r.destination
                .validate(c, &path.f("route").i(i).f("destination"));
        }
        check_weights(
            c,
            &path.f("route"),
            &routes.iter().map(|r| r.weight).collect::<Vec<_>>(),
        );
        if let Some(timeout) = &self.timeout {
            timeout.check_at_least_ms(c, &path.f("timeout"));
        }
        if let Some(retries) = &self.retries {
            let p = path.f("retries");
            if retries.attempts.is_some_and(|a| a < 0) {
                c.error(&p.f("attempts"), "attempts must not be negative");
            }
            if let Some(t) = &retries.per_try_timeout {
                t.check_at_least_ms(c, &p.f("perTryTimeout"));
            }
            for condition in retries.retry_on.iter().flat_map(|r| r.split(',')) {
                let condition = condition.trim();
                if !RETRY_ON.contains(&condition) && condition.parse::<u16>().is_err() {
                    let hint = crate::registry::closest(RETRY_ON.iter().copied(), condition)
                        .map(|near| format!(" (did you mean {near:?}?)"))
                        .unwrap_or_default();
                    c.error(
                        &p.f("retryOn"),
                        format!("unknown retry condition {condition:?}{hint}"),
                    );
                }
            }
        }
        if let Some(fault) = &self.fault {
            let p = path.f("fault");
            if fault.delay.is_none() && fault.abort.is_none() {
                c.error(&p, "fault needs a delay or an abort");
            }
            if let Some(delay) = &fault.delay {
                let dp = p.f("delay");
                c.one_of(
                    &dp,
                    &[
                        ("fixedDelay", delay.fixed_delay.is_some()),
                        ("exponentialDelay", delay.exponential_delay.is_some()),
                    ],
                    true,
                );
                if let Some(d) = &delay.fixed_delay {
                    d.check_at_least_ms(c, &dp.f("fixedDelay"));
                }
                check_percent(c, &dp.f("percentage"), &delay.percentage);
            }
            if let Some(abort) = &fault.abort {
                let ap = p.f("abort");
                c.one_of(
                    &ap,
                    &[
                        ("httpStatus", abort.http_status.is_some()),
                        ("grpcStatus", abort.grpc_status.is_some()),
                        ("http2Error", abort.http2_error.is_some()),
                    ],
                    true,
                );
                if let Some(status) = abort.http_status
                    && !(200..=599).contains(&status)
                {
                    c.error(
                        &ap.f("httpStatus"),
                        format!("HTTP status {status} must be between 200 and 599"),
                    );
                }
                check_percent(c, &ap.f("percentage"), &abort.percentage);
            }
        }
        if let Some(mirror) = &self.mirror {
            mirror.validate(c, &path.f("mirror"));
        }
        check_percent(c, &path.f("mirrorPercentage"), &self.mirror_percentage);
        if self.mirror.is_some() && self.mirrors.is_some() {
            c.error(
                path,
                "mirror and mirrors are mutually exclusive; set only one",
            );
        }
        for (i, m) in self.mirrors.iter().flatten().enumerate() {
            m.destination
                .validate(c, &path.f("mirrors").i(i).f("destination"));
            check_percent(c, &path.f("mirrors").i(i).f("percentage"), &m.percentage);
        }
        if let Some(rewrite) = &self.rewrite {
            let p = path.f("rewrite");
            if rewrite.uri.is_some() && rewrite.uri_regex_rewrite.is_some() {
                c.error(
                    &p,
                    "uri and uriRegexRewrite are mutually exclusive; set only one",
                );
            }
            if let Some(re) = &rewrite.uri_regex_rewrite {
                c.regex(&p.f("uriRegexRewrite").f("match"), &re.pattern);
            }
        }
        if let Some(redirect) = &self.redirect {
            let p = path.f("redirect");
            if let Some(port) = redirect.port {
                c.port(&p.f("port"), port);
            }
            if redirect.port.is_some() && redirect.derive_port.is_some() {
                c.error(
                    &p,
                    "port and derivePort are mutually exclusive; set only one",
                );
            }
            if let Some(code) = redirect.redirect_code
                && !matches!(code, 301 | 302 | 303 | 307 | 308)
            {
                c.error(
                    &p.f("redirectCode"),
                    format!("redirect code {code} must be 301, 302, 303, 307 or 308"),
                );
            }
        }
        if let Some(response) = &self.direct_response {
            let p = path.f("directResponse");
            if !(200..=599).contains(&response.status) {
                c.error(
                    &p.f("status"),
                    format!(
                        "HTTP status {} must be between 200 and 599",
                        response.status
                    ),
                );
            }
            if let Some(body) = &response.body {
                c.one_of(
                    &p.f("body"),
                    &[
                        ("string", body.string.is_some()),
                        ("bytes", body.bytes.is_some()),
                    ],
                    true,
                );
            }
        }
    }
}

impl SpecValidate for VirtualServiceSpec {
    fn validate(&self, c: &mut Checker, path: &Path) {
        let hosts = self.hosts.as_deref().unwrap_or_default();
        let is_delegate = hosts.is_empty();
        for (i, host) in hosts.iter().enumerate() {
            c.hostname(&path.f("hosts").i(i), host);
        }
        let (http, tls, tcp) = (
            self.http.as_deref().unwrap_or_default(),
            self.tls.as_deref().unwrap_or_default(),
            self.tcp.as_deref().unwrap_or_default(),
        );
        if http.is_empty() && tls.is_empty() && tcp.is_empty() {
            c.error(path, "at least one of http, tls or tcp routes is required");
        }
        if is_delegate && (!tls.is_empty() || !tcp.is_empty()) {
            c.error(
                &path.f("hosts"),
                "hosts is required (only HTTP delegate VirtualServices may omit it)",
            );
        }
        for (i, route) in http.iter().enumerate() {
            route.validate(c, &path.f("http").i(i));
        }
        c.unique_names(
            &path.f("http"),
            "name",
            "route name",
            http.iter()
                .enumerate()
                .filter_map(|(i, r)| Some((i, r.name.as_deref()?))),
        );
        for (i, route) in tls.iter().enumerate() {
            let p = path.f("tls").i(i);
            if route.matches.is_empty() {
                c.error(&p.f("match"), "a TLS route needs at least one match");
            }
            for (j, m) in route.matches.iter().enumerate() {
                let mp = p.f("match").i(j);
                if m.sni_hosts.is_empty() {
                    c.error(&mp.f("sniHosts"), "sniHosts is required");
                }
                for (k, host) in m.sni_hosts.iter().enumerate() {
                    c.hostname(&mp.f("sniHosts").i(k), host);
                }
                if let Some(port) = m.port {
                    c.port(&mp.f("port"), port);
                }
                for (k, subnet) in m.destination_subnets.iter().flatten().enumerate() {
                    c.ip_or_cidr(&mp.f("destinationSubnets").i(k), subnet);
                }
            }
            check_routes(c, &p, route.route.as_deref());
        }
        for (i, route) in tcp.iter().enumerate() {
            let p = path.f("tcp").i(i);
            for (j, m) in route.matches.iter().flatten().enumerate() {
                let mp = p.f("match").i(j);
                if let Some(port) = m.port {
                    c.port(&mp.f("port"), port);
                }
                for (k, subnet) in m.destination_subnets.iter().flatten().enumerate() {
                    c.ip_or_cidr(&mp.f("destinationSubnets").i(k), subnet);
                }
            }
            check_routes(c, &p, route.route.as_deref());
        }
        if let Some(export_to) = &self.export_to {
            check_export_to(c, &path.f("exportTo"), export_to);
        }
    }
}

fn check_routes(c: &mut Checker, path: &Path, routes: Option<&[RouteDestination]>) {
    let routes = routes.unwrap_or_default();
    if routes.is_empty() {
        c.error(
            &path.f("route"),
            "at least one route destination is required",
        );
    }
    for (i, r) in routes.iter().enumerate() {
        r.destination
            .validate(c, &path.f("route").i(i).f("destination"));
    }
    check_weights(
        c,
        &path.f("route"),
        &routes.iter().map(|r| r.weight).collect::<Vec<_>>(),
    );
}

pub type VirtualService = WithSpec<VirtualServiceSpec>;

pub static KIND: KindInfo = KindInfo {
    kind: "VirtualService",
    group: "networking.istio.io",
    versions: NETWORKING_VERSIONS,
    plural: "virtualservices",
    short_names: &["vs"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[("GATEWAYS", "/spec/gateways"), ("HOSTS", "/spec/hosts")],
    decode: decode_body::<VirtualService>,
    schema: body_schema::<VirtualService>,
};
