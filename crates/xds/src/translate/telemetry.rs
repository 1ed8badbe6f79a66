//! Telemetry in Envoy's terms, for one side of a sidecar's traffic: access
//! logs (Envoy's file logger, Istio's formats, a CEL filter), the tracer of
//! an HTTP connection manager (Zipkin or OpenTelemetry, sending to a mesh
//! service's outbound cluster), and Istio's standard metrics.
//!
//! Upstream Envoy has no Istio stats filter. Istio's metrics are made from
//! one line per request (or TCP connection event) and side that Envoy's
//! file logger writes to the metrics log, a pipe the agent reads and
//! counts (`vmesh_api::peer::METRICS_LOG_FILE`; [`metric_loggers`]): the
//! values measured, then each distinct label set once with the metrics
//! counted under it. A label set is one short field (positions, not names;
//! the proxy's own workload and principal left to the agent): formatting
//! it is most of what the metrics cost Envoy, so it is formatted once per
//! line, not once per metric, and kept short. The agent expands it into
//! Istio's labels. The peer's labels come from:
//! - the destination, on the client side: the endpoint's metadata
//!   ([`endpoint_metadata`]), the cluster's ([`service_metadata`]) and the
//!   upstream certificate's URI SAN;
//! - the source, on the server side: the request header the client side
//!   adds ([`peer_headers`], its own attributes from `%ENVIRONMENT(…)%`)
//!   moved into dynamic metadata by [`peer_metadata_filter`] (and stripped
//!   before the application), and the peer certificate's URI SAN.
//!
//! A workload's seven attributes travel as one encoded string everywhere
//! (environment, header, metadata, the `source`/`destination` positions):
//! one lookup per request rather than seven, and endpoints stay small in EDS.
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
use vmesh_api::peer::{self, StandardMetric};
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

/// The proxy's own encoded attributes, from its environment.
fn own_attributes() -> String {
    format!("%ENVIRONMENT({})%", peer::WORKLOAD_ENV)
}

/// Istio's standard labels of a metric as Envoy command operators, by
/// position (`peer::POSITIONAL_LABELS`), and the standard labels the
/// metric does not have.
fn standard_labels(
    direction: Direction,
    protocol: Protocol,
) -> (
    [String; peer::POSITIONAL_LABELS.len()],
    &'static [&'static str],
) {
    let inbound = matches!(direction, Direction::Inbound { .. });
    let http = protocol == Protocol::Http;
    let own = || peer::OWN_VALUE.to_string();
    // The peer: on the client side the endpoint; on the server side the
    // client's header (HTTP), or nothing but its certificate (TCP).
    let (source, source_principal, destination, destination_principal) = if inbound {
        let source = if http {
            format!(
                "%DYNAMIC_METADATA({}:{})%",
                peer::PEER_METADATA,
                peer::ATTRIBUTES_KEY
            )
        } else {
            peer::UNKNOWN.into()
        };
        (source, "%DOWNSTREAM_PEER_URI_SAN%".into(), own(), own())
    } else {
        let destination = format!(
            "%UPSTREAM_METADATA({}:{})%",
            peer::ENDPOINT_METADATA,
            peer::ATTRIBUTES_KEY
        );
        (own(), own(), destination, "%UPSTREAM_PEER_URI_SAN%".into())
    };
    let (response_code, grpc_status, missing): (&str, &str, &'static [&'static str]) = if http {
        ("%RESPONSE_CODE%", "%GRPC_STATUS_NUMBER%", &[])
    } else {
        ("", "", &["response_code", "grpc_response_status"])
    };
    let values = [
        if inbound { "destination" } else { "source" }.to_string(),
        source,
        source_principal,
        destination,
        destination_principal,
        format!(
            "%CLUSTER_METADATA({}:{})%",
            peer::ENDPOINT_METADATA,
            peer::SERVICE_KEY
        ),
        if http { "http" } else { "tcp" }.to_string(),
        response_code.to_string(),
        grpc_status.to_string(),
        "%RESPONSE_FLAGS%".to_string(),
        match direction {
            Direction::Outbound => "unknown",
            Direction::Inbound { mtls: true } => "mutual_tls",
            Direction::Inbound { mtls: false } => "none",
        }
        .to_string(),
    ];
    (values, missing)
}

/// A metric's label set after a Telemetry's overrides: standard labels by
/// position (removed ones empty), upserted ones set to their CEL
/// expression (in their position, or as `name=value` pairs), and the
/// removed ones named.
fn labels_with(
    rule: &MetricRule,
    (standard, missing): &([String; peer::POSITIONAL_LABELS.len()], &[&str]),
) -> String {
    let mut fields = standard.to_vec();
    let mut pairs = Vec::new();
    for (name, expression) in &rule.upserts {
        let value = format!("%CEL({expression})%");
        match peer::POSITIONAL_LABELS.iter().position(|l| l == name) {
            Some(position) => fields[position] = value,
            None => pairs.push(format!("{name}={value}")),
        }
    }
    let mut removed: Vec<&str> = missing.to_vec();
    for name in &rule.removed {
        if let Some(position) = peer::POSITIONAL_LABELS.iter().position(|l| l == name) {
            fields[position].clear();
        }
        removed.push(name);
    }
    if !removed.is_empty() {
        pairs.push(format!("{}={}", peer::REMOVED_LABELS, removed.join(",")));
    }
    fields.extend(pairs);
    fields.join(&peer::LABEL_SEPARATOR.to_string())
}

/// When Envoy logs a metric's line: at a request's end, or a TCP
/// connection's start or end.
fn moment(metric: &StandardMetric) -> AccessLogType {
    match metric.metric {
        IstioMetric::TcpOpenedConnections => AccessLogType::TcpUpstreamConnected,
        _ if metric.tcp => AccessLogType::TcpConnectionEnd,
        _ => AccessLogType::NotSet,
    }
}

/// The metrics loggers for one side and protocol: one file logger to the
/// metrics log per moment metrics are counted at, its line holding each
/// distinct label set once (a Telemetry's overrides can give metrics
/// different labels).
fn metric_loggers(
    side: &SideTelemetry,
    direction: Direction,
    protocol: Protocol,
) -> Vec<AccessLog> {
    let standard = standard_labels(direction, protocol);
    // Per moment: the metrics counted, and their label sets with codes.
    let mut by_moment: BTreeMap<i32, MomentLine> = BTreeMap::new();
    for metric in peer::STANDARD_METRICS
        .iter()
        .filter(|m| m.tcp == (protocol == Protocol::Tcp))
    {
        let rule = side.metric(metric.metric);
        if rule.disabled {
            continue;
        }
        let labels = labels_with(&rule, &standard);
        let line = by_moment.entry(moment(metric) as i32).or_default();
        line.metrics.push(metric);
        match line.label_sets.iter_mut().find(|(_, l)| *l == labels) {
            Some((codes, _)) => codes.push(metric.code),
            None => line.label_sets.push((metric.code.to_string(), labels)),
        }
    }
    by_moment
        .into_iter()
        .map(|(moment, line)| AccessLog {
            name: "envoy.access_loggers.file".into(),
            filter: (moment != AccessLogType::NotSet as i32).then(|| {
                log_type(AccessLogType::try_from(moment).unwrap_or(AccessLogType::NotSet))
            }),
            config_type: Some(access_log::ConfigType::TypedConfig(pack_any(
                FileAccessLog {
                    path: peer::METRICS_LOG_FILE.into(),
                    access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(
                        SubstitutionFormatString {
                            // A value Envoy does not have (no peer
                            // certificate, no gRPC status) is an empty
                            // label, not `-`.
                            omit_empty_values: true,
                            ..text_format(&line.format())
                        },
                    )),
                },
            ))),
        })
        .collect()
}

/// The metrics log line of one moment.
#[derive(Default)]
struct MomentLine {
    metrics: Vec<&'static StandardMetric>,
    /// Metric codes and the label set they share.
    label_sets: Vec<(String, String)>,
}

impl MomentLine {
    /// Its format: the values (only those some metric uses are formatted),
    /// then each label set with its codes.
    fn format(&self) -> String {
        let separator = peer::METRICS_LOG_SEPARATOR.to_string();
        let values = peer::LoggedValue::ALL.map(|value| {
            let used = self.metrics.iter().any(|m| {
                matches!(m.measure, peer::Measure::Sum(v) | peer::Measure::Histogram(v) if v == value)
            });
            if used { value.operator() } else { "" }
        });
        let mut line = values.join(&separator);
        for (codes, labels) in &self.label_sets {
            line.push_str(&format!("{separator}{codes}={labels}"));
        }
        line.push('\n');
        line
    }
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

/// The metadata of a cluster for `service`: its host, name and namespace,
/// encoded as one value (`peer::SERVICE_KEY`).
pub(super) fn service_metadata(host: &str, name: &str, namespace: &str) -> (String, Struct) {
    let separator = peer::ATTRIBUTE_SEPARATOR.to_string();
    let fields = [(
        peer::SERVICE_KEY.to_string(),
        string_value(&[host, name, namespace].join(&separator)),
    )]
    .into();
    (peer::ENDPOINT_METADATA.to_string(), Struct { fields })
}

/// Adds `entry` to a resource's metadata.
pub(super) fn add_metadata(metadata: &mut Option<core::Metadata>, entry: (String, Struct)) {
    metadata
        .get_or_insert_with(Default::default)
        .filter_metadata
        .insert(entry.0, entry.1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each metrics logger's line format.
    fn lines_of(side: &SideTelemetry, direction: Direction, protocol: Protocol) -> Vec<String> {
        metric_loggers(side, direction, protocol)
            .into_iter()
            .map(|log| {
                assert_eq!(log.name, "envoy.access_loggers.file");
                let Some(access_log::ConfigType::TypedConfig(any)) = log.config_type else {
                    panic!("a typed file logger");
                };
                let logger: FileAccessLog = prost::Message::decode(any.value.as_slice()).unwrap();
                assert_eq!(logger.path, peer::METRICS_LOG_FILE);
                let Some(file_access_log::AccessLogFormat::LogFormat(format)) =
                    logger.access_log_format
                else {
                    panic!("a format");
                };
                let Some(substitution_format_string::Format::TextFormatSource(source)) =
                    format.format
                else {
                    panic!("a text format");
                };
                let Some(data_source::Specifier::InlineString(line)) = source.specifier else {
                    panic!("an inline format");
                };
                line
            })
            .collect()
    }

    /// A line's values and its label sets' codes.
    fn shape(line: &str) -> (Vec<&str>, Vec<&str>) {
        let values = line
            .trim_end_matches('\n')
            .split(peer::METRICS_LOG_SEPARATOR)
            .take(3)
            .collect();
        let codes = label_sets(line)
            .into_iter()
            .map(|(codes, _)| codes)
            .collect();
        (values, codes)
    }

    #[test]
    fn one_line_per_request_with_each_label_set_once() {
        let lines = lines_of(
            &SideTelemetry::default(),
            Direction::Inbound { mtls: true },
            Protocol::Http,
        );
        assert_eq!(lines.len(), 1);
        assert_eq!(
            shape(&lines[0]),
            (
                vec!["%DURATION%", "%BYTES_RECEIVED%", "%BYTES_SENT%"],
                vec!["rdqs"]
            )
        );
        let mut differing = SideTelemetry::default();
        differing.metrics.insert(
            IstioMetric::RequestCount,
            MetricRule {
                removed: vec!["response_flags".into()],
                ..Default::default()
            },
        );
        differing.metrics.insert(
            IstioMetric::ResponseSize,
            MetricRule {
                disabled: true,
                ..Default::default()
            },
        );
        let lines = lines_of(&differing, Direction::Outbound, Protocol::Http);
        assert_eq!(
            shape(&lines[0]),
            (vec!["%DURATION%", "%BYTES_RECEIVED%", ""], vec!["r", "dq"]),
            "a disabled metric's value is not formatted"
        );
        // TCP: counted when the upstream connection is made, and at its end.
        let lines = lines_of(
            &SideTelemetry::default(),
            Direction::Outbound,
            Protocol::Tcp,
        );
        let shapes: Vec<_> = lines.iter().map(|l| shape(l)).collect();
        assert_eq!(
            shapes,
            [
                (vec!["", "", ""], vec!["o"]),
                (vec!["", "%BYTES_RECEIVED%", "%BYTES_SENT%"], vec!["ctv"]),
            ]
        );
        let mut off = SideTelemetry::default();
        for metric in peer::STANDARD_METRICS {
            off.metrics.insert(
                metric.metric,
                MetricRule {
                    disabled: true,
                    ..Default::default()
                },
            );
        }
        assert!(lines_of(&off, Direction::Outbound, Protocol::Http).is_empty());
    }

    /// A line's label sets: (codes, labels).
    fn label_sets(line: &str) -> Vec<(&str, &str)> {
        line.trim_end_matches('\n')
            .split(peer::METRICS_LOG_SEPARATOR)
            .skip(3)
            .map(|set| set.split_once('=').unwrap())
            .collect()
    }

    #[test]
    fn tags_hold_positions_own_markers_and_overrides() {
        let lines = lines_of(
            &SideTelemetry::default(),
            Direction::Inbound { mtls: true },
            Protocol::Http,
        );
        let labels = label_sets(&lines[0])[0].1;
        let fields: Vec<&str> = labels.split(peer::LABEL_SEPARATOR).collect();
        assert_eq!(fields.len(), peer::POSITIONAL_LABELS.len());
        assert_eq!(fields[0], "destination");
        assert_eq!(fields[1], "%DYNAMIC_METADATA(vmesh.peer:workload)%");
        assert_eq!(fields[3], peer::OWN_VALUE);
        assert_eq!(fields[4], peer::OWN_VALUE);
        assert_eq!(fields[10], "mutual_tls");

        let mut side = SideTelemetry::default();
        side.metrics.insert(
            IstioMetric::RequestSize,
            MetricRule {
                disabled: false,
                upserts: [
                    ("response_code".to_string(), "response.code".to_string()),
                    ("route".to_string(), "xds.route_name".to_string()),
                ]
                .into(),
                removed: vec!["response_flags".into(), "source_app".into()],
            },
        );
        let lines = lines_of(&side, Direction::Outbound, Protocol::Http);
        let sets = label_sets(&lines[0]);
        let (_, tag) = sets.iter().find(|(codes, _)| *codes == "q").unwrap();
        let fields: Vec<&str> = tag.split(peer::LABEL_SEPARATOR).collect();
        assert_eq!(fields[7], "%CEL(response.code)%");
        assert_eq!(fields[9], "", "a removed position is left empty");
        assert_eq!(
            &fields[11..],
            [
                "route=%CEL(xds.route_name)%",
                "removed=response_flags,source_app"
            ]
        );
        // And the agent reads it back as Istio's labels.
        let own = peer::OwnWorkload::default();
        let labels = peer::expand_labels(tag, &own);
        assert!(labels.iter().any(|(k, _)| k == "route"));
        assert!(
            !labels
                .iter()
                .any(|(k, _)| k == "response_flags" || k == "source_app")
        );
    }
}
