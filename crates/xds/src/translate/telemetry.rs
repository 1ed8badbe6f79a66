//! Telemetry in Envoy's terms, for one side of a sidecar's traffic: access
//! logs (Envoy's file logger, Istio's formats, a CEL filter), the tracer of
//! an HTTP connection manager (Zipkin or OpenTelemetry, sending to a mesh
//! service's outbound cluster), and Istio's standard metrics.
//!
//! Upstream Envoy has no Istio stats filter. Istio's metrics are made by
//! Envoy's stats access logger (`envoy.access_loggers.stats`): once per
//! request (or TCP connection) it counts into native Envoy stats tagged by
//! command operators. All of a metric's labels are one tag
//! (`vmesh_api::peer::METRIC_LABELS_TAG`, `name=value|…`): Envoy formats one
//! string and finds one stat per request rather than one per label, which
//! is what keeps the cost low; the agent's merged endpoint expands the tag
//! into Istio's labels. The labels come from:
//! - the proxy's own workload: `%ENVIRONMENT(…)%` of the variables the agent
//!   puts in Envoy's environment (`vmesh_api::peer`), so that configuration
//!   shared by many proxies still names each;
//! - the destination, on the client side: the endpoint's metadata
//!   ([`endpoint_metadata`]) and the cluster's ([`service_metadata`]);
//! - the source, on the server side: the request header the client side
//!   adds ([`peer_headers`]) moved into dynamic metadata by
//!   [`peer_metadata_filter`] (and stripped before the application), and the
//!   peer certificate's URI SAN.
//!
//! A workload's seven attributes travel as one encoded string everywhere
//! (environment, header, metadata, the `source`/`destination` pairs): one
//! lookup per request rather than seven, and endpoints stay small in EDS.
//!
//! Which Telemetry applies is the registry's decision (`telemetry_for`).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::accesslog::v3::{
    AccessLog, AccessLogFilter, ExtensionFilter, LogTypeFilter, access_log, access_log_filter,
    extension_filter,
};
use envoy_types::pb::envoy::config::core::v3::{
    self as core, DataSource, GrpcService, HeaderValue, HeaderValueOption, HttpService, HttpUri,
    SubstitutionFormatString, data_source, grpc_service, header_value_option, http_uri,
    substitution_format_string,
};
use envoy_types::pb::envoy::config::trace::v3::{
    OpenTelemetryConfig, ZipkinConfig, tracing, zipkin_config,
};
use envoy_types::pb::envoy::data::accesslog::v3::AccessLogType;
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
    FileAccessLog, file_access_log,
};
use envoy_types::pb::envoy::extensions::access_loggers::filters::cel::v3::ExpressionFilter;
use envoy_types::pb::envoy::extensions::access_loggers::stats::v3::{
    Config as StatsLogger, config as stats,
};
use envoy_types::pb::envoy::extensions::filters::http::header_to_metadata::v3::{
    Config as HeaderToMetadata, config as header_to_metadata,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::r#type::tracing::v3::{CustomTag as EnvoyTag, custom_tag};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::util::pack_any;
use vmesh_api::kinds::telemetry::IstioMetric;
use vmesh_api::peer;
use vmesh_registry::telemetry::{
    AccessLog as LogSpec, AccessLogFormat, CustomTag, MetricRule, SideTelemetry, TracerKind,
    Tracing,
};
use vmesh_registry::{MeshService, Snapshot};

use super::cluster::cluster_name;
use super::proto::u32_value;

/// Istio's default text access log line (`EnvoyTextLogFormat`).
pub const ISTIO_TEXT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's default JSON access log labels (`EnvoyJSONLogFormatIstio`).
const ISTIO_JSON_LABELS: [(&str, &str); 24] = [
    ("start_time", "%START_TIME%"),
    ("route_name", "%ROUTE_NAME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
];

/// The stats scope of Istio's metrics: Envoy exports them as
/// `envoy_istio_<name>`; the agent's merged endpoint serves them under
/// Istio's own names (`istio_<name>`).
pub const METRICS_SCOPE: &str = "istio";

/// Cluster metadata keys naming the service a cluster is for.
const SERVICE_HOST: &str = "service_host";
const SERVICE_NAME: &str = "service_name";
const SERVICE_NAMESPACE: &str = "service_namespace";

/// Which traffic a listener carries, as its metrics report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// Outbound: `reporter="source"`.
    Outbound,
    /// Inbound, over mutual TLS or not: `reporter="destination"`.
    Inbound { mtls: bool },
}

/// Which protocol a listener's telemetry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Http,
    Tcp,
}

/// The access loggers of a connection manager or TCP proxy: the access logs
/// the Telemetry asks for, then the metrics.
pub(super) fn access_loggers(
    side: &SideTelemetry,
    direction: Direction,
    protocol: Protocol,
) -> Vec<AccessLog> {
    let mut loggers: Vec<AccessLog> = side
        .access_logs
        .iter()
        .map(|log| file_logger(log, protocol))
        .collect();
    loggers.extend(metric_loggers(side, direction, protocol));
    loggers
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn file_logger(log: &LogSpec, protocol: Protocol) -> AccessLog {
    let format = match &log.format {
        AccessLogFormat::IstioText => text_format(ISTIO_TEXT_FORMAT),
        AccessLogFormat::Text(text) if text.ends_with('\n') => text_format(text),
        AccessLogFormat::Text(text) => text_format(&format!("{text}\n")),
        AccessLogFormat::IstioJson => json_format(
            ISTIO_JSON_LABELS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        ),
        AccessLogFormat::Json(labels) => json_format(labels.clone()),
    };
    let filter = log.filter.as_ref().map(|expression| AccessLogFilter {
        filter_specifier: Some(access_log_filter::FilterSpecifier::ExtensionFilter(
            ExtensionFilter {
                name: "envoy.access_loggers.extension_filters.cel".into(),
                config_type: Some(extension_filter::ConfigType::TypedConfig(pack_any(
                    ExpressionFilter {
                        expression: expression.clone(),
                        ..Default::default()
                    },
                ))),
            },
        )),
    });
    // A TCP proxy logs once, when the connection ends.
    let filter = match protocol {
        Protocol::Http => filter,
        Protocol::Tcp => Some(and(log_type(AccessLogType::TcpConnectionEnd), filter)),
    };
    AccessLog {
        name: "envoy.access_loggers.file".into(),
        filter,
        config_type: Some(access_log::ConfigType::TypedConfig(pack_any(
            FileAccessLog {
                path: log.path.clone(),
                access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(format)),
            },
        ))),
    }
}

fn text_format(text: &str) -> SubstitutionFormatString {
    SubstitutionFormatString {
        format: Some(substitution_format_string::Format::TextFormatSource(
            DataSource {
                specifier: Some(data_source::Specifier::InlineString(text.to_string())),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

fn json_format(labels: impl IntoIterator<Item = (String, String)>) -> SubstitutionFormatString {
    SubstitutionFormatString {
        format: Some(substitution_format_string::Format::JsonFormat(Struct {
            fields: labels
                .into_iter()
                .map(|(k, v)| (k, string_value(&v)))
                .collect(),
        })),
        ..Default::default()
    }
}

fn log_type(kind: AccessLogType) -> AccessLogFilter {
    AccessLogFilter {
        filter_specifier: Some(access_log_filter::FilterSpecifier::LogTypeFilter(
            LogTypeFilter {
                types: vec![kind as i32],
                exclude: false,
            },
        )),
    }
}

fn and(first: AccessLogFilter, second: Option<AccessLogFilter>) -> AccessLogFilter {
    match second {
        None => first,
        Some(second) => AccessLogFilter {
            filter_specifier: Some(access_log_filter::FilterSpecifier::AndFilter(
                envoy_types::pb::envoy::config::accesslog::v3::AndFilter {
                    filters: vec![first, second],
                },
            )),
        },
    }
}

/// The proxy's own encoded attributes.
fn own_attributes() -> String {
    format!("%ENVIRONMENT({})%", peer::WORKLOAD_ENV)
}

fn own_principal() -> String {
    format!("%ENVIRONMENT({})%", peer::PRINCIPAL_ENV)
}

fn cluster_value(key: &str) -> String {
    format!("%CLUSTER_METADATA({}:{key})%", peer::ENDPOINT_METADATA)
}

/// Istio's standard labels of a metric as Envoy command operators; the
/// `source` and `destination` pairs hold encoded attributes that the agent
/// expands into Istio's `source_workload`… (`vmesh_api::peer::expand_labels`).
fn standard_labels(direction: Direction, protocol: Protocol) -> Vec<(&'static str, String)> {
    let inbound = matches!(direction, Direction::Inbound { .. });
    let http = protocol == Protocol::Http;
    // The source: the proxy itself on the client side; on the server side
    // the client's header (HTTP), or nothing but its certificate (TCP).
    let source = match (inbound, http) {
        (false, _) => own_attributes(),
        (true, true) => format!(
            "%DYNAMIC_METADATA({}:{})%",
            peer::PEER_METADATA,
            peer::ATTRIBUTES_KEY
        ),
        (true, false) => peer::UNKNOWN.into(),
    };
    let destination = if inbound {
        own_attributes()
    } else {
        format!(
            "%UPSTREAM_METADATA({}:{})%",
            peer::ENDPOINT_METADATA,
            peer::ATTRIBUTES_KEY
        )
    };
    let (source_principal, destination_principal) = if inbound {
        ("%DOWNSTREAM_PEER_URI_SAN%".to_string(), own_principal())
    } else {
        (own_principal(), "%UPSTREAM_PEER_URI_SAN%".to_string())
    };
    let mut labels = vec![
        (
            "reporter",
            if inbound { "destination" } else { "source" }.to_string(),
        ),
        ("source", source),
        ("source_principal", source_principal),
        ("destination", destination),
        ("destination_principal", destination_principal),
        ("destination_service", cluster_value(SERVICE_HOST)),
        ("destination_service_name", cluster_value(SERVICE_NAME)),
        (
            "destination_service_namespace",
            cluster_value(SERVICE_NAMESPACE),
        ),
    ];
    if http {
        labels.extend([
            ("request_protocol", "http".to_string()),
            ("response_code", "%RESPONSE_CODE%".to_string()),
            ("grpc_response_status", "%GRPC_STATUS_NUMBER%".to_string()),
        ]);
    } else {
        labels.push(("request_protocol", "tcp".to_string()));
    }
    labels.push(("response_flags", "%RESPONSE_FLAGS%".to_string()));
    labels.push((
        "connection_security_policy",
        match direction {
            Direction::Outbound => "unknown",
            Direction::Inbound { mtls: true } => "mutual_tls",
            Direction::Inbound { mtls: false } => "none",
        }
        .to_string(),
    ));
    labels
}

/// One of Istio's metrics: its name (under [`METRICS_SCOPE`]) and what it counts.
enum Measure {
    /// A counter of requests or connections (`value_fixed: 1`).
    Count,
    /// A counter of a number per request or connection.
    Sum(&'static str),
    /// A histogram.
    Histogram(&'static str, stats::histogram::Unit),
}

fn measures(protocol: Protocol) -> Vec<(IstioMetric, &'static str, Measure, AccessLogType)> {
    use stats::histogram::Unit;
    match protocol {
        Protocol::Http => vec![
            (
                IstioMetric::RequestCount,
                "requests_total",
                Measure::Count,
                AccessLogType::NotSet,
            ),
            (
                IstioMetric::RequestDuration,
                "request_duration_milliseconds",
                Measure::Histogram("%DURATION%", Unit::Milliseconds),
                AccessLogType::NotSet,
            ),
            (
                IstioMetric::RequestSize,
                "request_bytes",
                Measure::Histogram("%BYTES_RECEIVED%", Unit::Bytes),
                AccessLogType::NotSet,
            ),
            (
                IstioMetric::ResponseSize,
                "response_bytes",
                Measure::Histogram("%BYTES_SENT%", Unit::Bytes),
                AccessLogType::NotSet,
            ),
        ],
        Protocol::Tcp => vec![
            (
                IstioMetric::TcpOpenedConnections,
                "tcp_connections_opened_total",
                Measure::Count,
                AccessLogType::TcpUpstreamConnected,
            ),
            (
                IstioMetric::TcpClosedConnections,
                "tcp_connections_closed_total",
                Measure::Count,
                AccessLogType::TcpConnectionEnd,
            ),
            (
                IstioMetric::TcpSentBytes,
                "tcp_sent_bytes_total",
                Measure::Sum("%BYTES_SENT%"),
                AccessLogType::TcpConnectionEnd,
            ),
            (
                IstioMetric::TcpReceivedBytes,
                "tcp_received_bytes_total",
                Measure::Sum("%BYTES_RECEIVED%"),
                AccessLogType::TcpConnectionEnd,
            ),
        ],
    }
}

/// The labels of a metric after a Telemetry's overrides (removed ones
/// dropped, upserted ones set to their CEL expression), as the one tag
/// [`peer::METRIC_LABELS_TAG`] holding every `name=value` pair.
fn labels_with(rule: &MetricRule, standard: &[(&'static str, String)]) -> Vec<stats::Tag> {
    let mut labels: Vec<(String, String)> = standard
        .iter()
        .filter(|(name, _)| !rule.removed.iter().any(|r| r == name))
        .map(|(name, value)| (name.to_string(), value.clone()))
        .collect();
    for (name, expression) in &rule.upserts {
        let value = format!("%CEL({expression})%");
        match labels.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => labels.push((name.clone(), value)),
        }
    }
    // Removed labels that the agent expands from `source`/`destination`.
    let expanded: Vec<&str> = rule
        .removed
        .iter()
        .map(String::as_str)
        .filter(|name| !standard.iter().any(|(n, _)| n == name))
        .collect();
    if !expanded.is_empty() {
        labels.push((peer::REMOVED_LABELS.into(), expanded.join(",")));
    }
    let joined: Vec<String> = labels
        .into_iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    vec![stats::Tag {
        name: peer::METRIC_LABELS_TAG.into(),
        value_format: joined.join(&peer::LABEL_SEPARATOR.to_string()),
        rules: None,
    }]
}

/// The stats loggers of Istio's metrics for one side and protocol, one per
/// moment they are counted at (a request's end; a TCP connection's start or end).
fn metric_loggers(
    side: &SideTelemetry,
    direction: Direction,
    protocol: Protocol,
) -> Vec<AccessLog> {
    let standard = standard_labels(direction, protocol);
    let mut by_moment: BTreeMap<i32, StatsLogger> = BTreeMap::new();
    for (metric, name, measure, moment) in measures(protocol) {
        let rule = side.metric(metric);
        if rule.disabled {
            continue;
        }
        let stat = Some(stats::Stat {
            name: name.to_string(),
            tags: labels_with(&rule, &standard),
        });
        let logger = by_moment
            .entry(moment as i32)
            .or_insert_with(|| StatsLogger {
                // One scope for every logger of the proxy, old listeners'
                // included: one set of stats to look up, merge and flush,
                // not a set per listener and configuration version.
                stats_scope: Some(envoy_types::pb::envoy::r#type::v3::Scope {
                    prefix: METRICS_SCOPE.into(),
                    sharing_name: METRICS_SCOPE.into(),
                    ..Default::default()
                }),
                ..Default::default()
            });
        match measure {
            Measure::Count => logger.counters.push(stats::Counter {
                stat,
                value_fixed: Some(envoy_types::pb::google::protobuf::UInt64Value { value: 1 }),
                ..Default::default()
            }),
            Measure::Sum(value) => logger.counters.push(stats::Counter {
                stat,
                value_format: value.to_string(),
                ..Default::default()
            }),
            Measure::Histogram(value, unit) => logger.histograms.push(stats::Histogram {
                stat,
                unit: unit as i32,
                value_format: value.to_string(),
            }),
        }
    }
    by_moment
        .into_iter()
        .map(|(moment, logger)| AccessLog {
            name: "envoy.access_loggers.stats".into(),
            filter: (moment != AccessLogType::NotSet as i32).then(|| {
                log_type(AccessLogType::try_from(moment).unwrap_or(AccessLogType::NotSet))
            }),
            config_type: Some(access_log::ConfigType::TypedConfig(pack_any(logger))),
        })
        .collect()
}

/// The tracer of a connection manager, when the Telemetry asks for one and
/// its collector is a service of the mesh (else Envoy would refuse the
/// listener for want of the cluster).
pub(super) fn http_tracing(
    snapshot: &Snapshot,
    side: &SideTelemetry,
) -> Option<http_connection_manager::Tracing> {
    let tracing = side.tracing.as_ref()?;
    if tracing.span_reporting_disabled {
        return None;
    }
    let provider = &tracing.provider;
    // Istio names the service `namespace/host` or `host`.
    let host = provider
        .service
        .split_once('/')
        .map_or(provider.service.as_str(), |(_, host)| host);
    let service = snapshot.service(host)?;
    service.ports.iter().find(|p| p.port == provider.port)?;
    let cluster = cluster_name(provider.port, "", &service.hostname);
    let (name, config) = match &provider.kind {
        TracerKind::Zipkin {
            path,
            trace_id_128bit,
        } => (
            "envoy.tracers.zipkin",
            pack_any(ZipkinConfig {
                collector_cluster: cluster,
                collector_endpoint: path.clone(),
                collector_hostname: service.hostname.clone(),
                trace_id_128bit: *trace_id_128bit,
                shared_span_context: Some(envoy_types::pb::google::protobuf::BoolValue {
                    value: false,
                }),
                collector_endpoint_version: zipkin_config::CollectorEndpointVersion::HttpJson
                    as i32,
                ..Default::default()
            }),
        ),
        TracerKind::OpenTelemetry { http_path } => (
            "envoy.tracers.opentelemetry",
            pack_any(OpenTelemetryConfig {
                // The agent names the service in OTEL_RESOURCE_ATTRIBUTES:
                // one configuration serves every proxy.
                resource_detectors: vec![core::TypedExtensionConfig {
                    name: "envoy.tracers.opentelemetry.resource_detectors.environment".into(),
                    typed_config: Some(pack_any(
                        envoy_types::pb::envoy::extensions::tracers::opentelemetry::resource_detectors::v3::EnvironmentResourceDetectorConfig {},
                    )),
                }],
                grpc_service: http_path.is_none().then(|| GrpcService {
                    target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                        grpc_service::EnvoyGrpc {
                            cluster_name: cluster.clone(),
                            authority: service.hostname.clone(),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }),
                http_service: http_path.as_ref().map(|path| HttpService {
                    http_uri: Some(HttpUri {
                        uri: format!("{}{path}", service.hostname),
                        timeout: Some(super::proto::duration(std::time::Duration::from_secs(5))),
                        http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(
                            cluster.clone(),
                        )),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
    };
    let percent = |value: f64| Some(Percent { value });
    Some(http_connection_manager::Tracing {
        client_sampling: percent(100.0),
        random_sampling: percent(tracing.sampling),
        overall_sampling: percent(100.0),
        max_path_tag_length: provider.max_tag_length.and_then(u32_value),
        custom_tags: custom_tags(tracing),
        provider: Some(tracing::Http {
            name: name.into(),
            config_type: Some(tracing::http::ConfigType::TypedConfig(config)),
        }),
        ..Default::default()
    })
}

fn custom_tags(tracing: &Tracing) -> Vec<EnvoyTag> {
    tracing
        .custom_tags
        .iter()
        .map(|(tag, value)| EnvoyTag {
            tag: tag.clone(),
            r#type: Some(match value {
                CustomTag::Literal(value) => custom_tag::Type::Literal(custom_tag::Literal {
                    value: value.clone(),
                }),
                CustomTag::Environment { name, default } => {
                    custom_tag::Type::Environment(custom_tag::Environment {
                        name: name.clone(),
                        default_value: default.clone(),
                    })
                }
                CustomTag::Header { name, default } => {
                    custom_tag::Type::RequestHeader(custom_tag::Header {
                        name: name.clone(),
                        default_value: default.clone(),
                    })
                }
            }),
        })
        .collect()
}

/// The server side's first HTTP filter: moves the client's encoded
/// attributes from its request header into dynamic metadata (`unknown` when
/// absent) and strips the header before the application sees the request.
pub(super) fn peer_metadata_filter() -> HttpFilter {
    let pair = |value: &str| header_to_metadata::KeyValuePair {
        metadata_namespace: peer::PEER_METADATA.into(),
        key: peer::ATTRIBUTES_KEY.into(),
        value: value.into(),
        ..Default::default()
    };
    let rule = header_to_metadata::Rule {
        header: peer::PEER_HEADER.into(),
        on_header_present: Some(pair("")),
        on_header_missing: Some(pair(peer::UNKNOWN)),
        remove: true,
        ..Default::default()
    };
    HttpFilter {
        name: "envoy.filters.http.header_to_metadata".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            HeaderToMetadata {
                request_rules: vec![rule],
                ..Default::default()
            },
        ))),
        ..Default::default()
    }
}

/// The request header a client side adds for a mesh destination: its own
/// encoded attributes, read from its environment.
pub(super) fn peer_headers() -> Vec<HeaderValueOption> {
    vec![HeaderValueOption {
        header: Some(HeaderValue {
            key: peer::PEER_HEADER.into(),
            value: own_attributes(),
            ..Default::default()
        }),
        append_action: header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }]
}

/// The metadata of a destination endpoint: its workload's encoded attributes.
pub(super) fn endpoint_metadata(
    endpoint: &vmesh_registry::MeshEndpoint,
    service: &MeshService,
) -> (String, Struct) {
    let namespace = endpoint
        .workload
        .split_once('/')
        .map_or(service.namespace.as_str(), |(ns, _)| ns);
    let attributes = peer::WorkloadAttributes {
        workload: endpoint.workload_name.clone(),
        namespace: namespace.to_string(),
        labels: endpoint.labels.clone(),
        cluster: String::new(),
    };
    let fields = [(
        peer::ATTRIBUTES_KEY.to_string(),
        string_value(&attributes.encode()),
    )]
    .into();
    (peer::ENDPOINT_METADATA.to_string(), Struct { fields })
}

/// The metadata of a cluster for `service`: its host, name and namespace.
pub(super) fn service_metadata(host: &str, name: &str, namespace: &str) -> (String, Struct) {
    let fields = [
        (SERVICE_HOST, host),
        (SERVICE_NAME, name),
        (SERVICE_NAMESPACE, namespace),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), string_value(v)))
    .collect();
    (peer::ENDPOINT_METADATA.to_string(), Struct { fields })
}

/// Adds `entry` to a resource's metadata.
pub(super) fn add_metadata(metadata: &mut Option<core::Metadata>, entry: (String, Struct)) {
    metadata
        .get_or_insert_with(Default::default)
        .filter_metadata
        .insert(entry.0, entry.1);
}
