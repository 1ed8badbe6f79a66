//! Mutual TLS between sidecars: what a client cluster presents and checks
//! (Istio's auto-mTLS, overridden by a DestinationRule's `tls`), and what an
//! inbound port accepts (the mode PeerAuthentication at mesh, namespace and
//! workload level gives it, with `portLevelMtls`).
//!
//! Which PeerAuthentication decides a port's mode is the registry's decision
//! (`Snapshot::peer_mode`). Certificates never travel in xDS: Envoy gets
//! them from its agent over SDS (secrets `default` and `ROOTCA` on the
//! bootstrap cluster `sds-grpc`); this module only names them. Who may call
//! what is `authz`'s job.

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster::TransportSocketMatch};
use envoy_types::pb::envoy::config::core::v3::{
    self as core, ApiConfigSource, ConfigSource, DataSource, GrpcService, TransportSocket,
    api_config_source, config_source, data_source, grpc_service, transport_socket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext, common_tls_context,
    subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Struct, Value, value::Kind};
use envoy_types::util::pack_any;
use vmesh_api::kinds::destination_rule::{ClientTlsMode, ClientTlsSettings};
use vmesh_registry::{MeshEndpoint, MeshService, Snapshot};

use crate::node::Proxy;

/// The bootstrap cluster that reaches the agent's SDS server.
pub const SDS_CLUSTER: &str = "sds-grpc";
/// The workload's own certificate and key.
pub const DEFAULT_SECRET: &str = "default";
/// The mesh root, as a validation context.
pub const ROOT_SECRET: &str = "ROOTCA";
/// Istio's label for a workload that runs a sidecar and speaks mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// Where Envoy looks for the metadata a transport socket match reads.
const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";
/// The ALPN a sidecar offers another sidecar, as Istio's do.
const MESH_ALPN: &[&str] = &["istio-peer-exchange", "istio"];

/// A reference to one of the agent's secrets.
pub fn sds_secret(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(ConfigSource {
            resource_api_version: core::ApiVersion::V3 as i32,
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: api_config_source::ApiType::Grpc as i32,
                    transport_api_version: core::ApiVersion::V3 as i32,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: SDS_CLUSTER.into(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}

/// Whether an endpoint runs a sidecar that accepts mesh mTLS, by Istio's
/// rule for WorkloadEntries: its `security.istio.io/tlsMode` label when it
/// has one, else `istio` when it names a service account.
pub fn is_mesh_endpoint(endpoint: &MeshEndpoint) -> bool {
    match endpoint.labels.get(TLS_MODE_LABEL) {
        Some(mode) => mode == "istio",
        None => endpoint
            .service_account
            .as_deref()
            .is_some_and(|account| !account.is_empty()),
    }
}

fn string(value: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(value.into())),
    }
}

/// The metadata that makes a cluster's `tlsMode-istio` socket match an endpoint.
pub fn mesh_endpoint_metadata() -> core::Metadata {
    core::Metadata {
        filter_metadata: [(
            TRANSPORT_SOCKET_MATCH.to_string(),
            Struct {
                fields: [("tlsMode".to_string(), string("istio"))].into(),
            },
        )]
        .into(),
        ..Default::default()
    }
}

fn tls_socket(context: Any) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(context)),
    }
}

fn uri_san(uri: String) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: subject_alt_name_matcher::SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(uri)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The identities a service's endpoints run as: what a client accepts from the server.
fn service_identities(service: &MeshService, trust_domain: &str) -> Vec<String> {
    let mut identities: Vec<String> = service
        .endpoints
        .iter()
        .filter_map(|e| {
            let namespace = e.workload.split('/').next().unwrap_or(&service.namespace);
            Some(format!(
                "spiffe://{trust_domain}/ns/{namespace}/sa/{}",
                e.service_account.as_ref()?
            ))
        })
        .collect();
    identities.sort();
    identities.dedup();
    identities
}

/// A client's mesh mTLS to `service`: our certificate, the mesh root, and the
/// server's identity checked against the service's accounts.
fn istio_mutual(service: &MeshService, port: u16, trust_domain: &str) -> TransportSocket {
    let identities = service_identities(service, trust_domain);
    tls_socket(pack_any(UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds_secret(DEFAULT_SECRET)],
            alpn_protocols: MESH_ALPN.iter().map(|p| p.to_string()).collect(),
            validation_context_type: Some(
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: identities
                                .into_iter()
                                .map(uri_san)
                                .collect(),
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds_secret(ROOT_SECRET)),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        sni: format!("outbound_.{port}_._.{}", service.hostname),
        ..Default::default()
    }))
}

fn file(path: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::Filename(path.into())),
        ..Default::default()
    })
}

/// `SIMPLE` or `MUTUAL` TLS to a server outside the mesh, with the
/// operator's files.
fn operator_tls(settings: &ClientTlsSettings, mutual: bool, host: &str) -> TransportSocket {
    let validation =
        (settings.insecure_skip_verify != Some(true)).then(|| CertificateValidationContext {
            trusted_ca: settings.ca_certificates.as_deref().and_then(file),
            match_typed_subject_alt_names: settings
                .subject_alt_names
                .iter()
                .flatten()
                .map(|name| SubjectAltNameMatcher {
                    san_type: subject_alt_name_matcher::SanType::Dns as i32,
                    matcher: Some(StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact(name.clone())),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    let certificates = match (mutual, &settings.client_certificate, &settings.private_key) {
        (true, Some(chain), Some(key)) => vec![TlsCertificate {
            certificate_chain: file(chain),
            private_key: file(key),
            ..Default::default()
        }],
        _ => Vec::new(),
    };
    tls_socket(pack_any(UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificates: certificates,
            validation_context_type: validation
                .map(common_tls_context::ValidationContextType::ValidationContext),
            ..Default::default()
        }),
        sni: settings.sni.clone().unwrap_or_else(|| host.to_string()),
        ..Default::default()
    }))
}

/// Secures a cluster's connections to `service`: the DestinationRule's `tls`
/// when it has one, else Istio's auto-mTLS (mTLS to endpoints that run a
/// sidecar, plaintext to the others).
pub fn secure_cluster(
    cluster: &mut Cluster,
    service: &MeshService,
    port: u16,
    tls: Option<&ClientTlsSettings>,
    trust_domain: &str,
) {
    match tls.and_then(|t| t.mode.map(|mode| (t, mode))) {
        None => {
            if service.endpoints.iter().any(is_mesh_endpoint) {
                cluster.transport_socket_matches = vec![
                    TransportSocketMatch {
                        name: "tlsMode-istio".into(),
                        r#match: Some(Struct {
                            fields: [("tlsMode".to_string(), string("istio"))].into(),
                        }),
                        transport_socket: Some(istio_mutual(service, port, trust_domain)),
                    },
                    TransportSocketMatch {
                        name: "tlsMode-disabled".into(),
                        r#match: Some(Struct::default()),
                        transport_socket: Some(plaintext()),
                    },
                ];
            }
        }
        Some((_, ClientTlsMode::Disable)) => {}
        Some((_, ClientTlsMode::IstioMutual)) => {
            cluster.transport_socket = Some(istio_mutual(service, port, trust_domain));
        }
        Some((settings, ClientTlsMode::Simple)) => {
            cluster.transport_socket = Some(operator_tls(settings, false, &service.hostname));
        }
        Some((settings, ClientTlsMode::Mutual)) => {
            cluster.transport_socket = Some(operator_tls(settings, true, &service.hostname));
        }
    }
}

fn plaintext() -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.raw_buffer".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
            RawBuffer::default(),
        ))),
    }
}

pub use vmesh_registry::PeerMode;

/// The PeerAuthentication mode for one of the proxy's ports, as the registry
/// decides it (`Snapshot::peer_mode`).
pub fn peer_mode(snapshot: &Snapshot, proxy: &Proxy, port: u16) -> PeerMode {
    snapshot.peer_mode(&proxy.namespace, &proxy.labels, port).0
}

/// What an inbound chain for mesh mTLS presents and requires: our
/// certificate, and a client certificate from the mesh root.
pub fn inbound_tls() -> TransportSocket {
    tls_socket(pack_any(DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds_secret(DEFAULT_SECRET)],
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                    sds_secret(ROOT_SECRET),
                ),
            ),
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::protobuf::Struct;

    use super::*;
    use crate::testing::snapshot;

    fn proxy(app: &str) -> Proxy {
        let labels = Struct {
            fields: [("app".to_string(), string(app))].into(),
        };
        Proxy::from_node(Some(&Node {
            id: "sidecar~10.0.0.1~vm.shop~shop.svc.cluster.local".into(),
            metadata: Some(Struct {
                fields: [(
                    "LABELS".to_string(),
                    Value {
                        kind: Some(Kind::StructValue(labels)),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        }))
        .unwrap()
    }

    fn policy(namespace: &str, name: &str, body: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {body}\n"
        )
    }

    #[test]
    fn the_most_specific_policy_decides_each_port() {
        let mesh = policy("istio-system", "mesh", "{mtls: {mode: STRICT}}");
        let namespace = policy(
            "shop",
            "ns",
            "{selector: {}, mtls: {mode: PERMISSIVE}, portLevelMtls: {9000: {mode: DISABLE}}}",
        );
        let workload = policy(
            "shop",
            "web",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
        );

        assert_eq!(
            peer_mode(&snapshot(""), &proxy("web"), 80),
            PeerMode::Permissive
        );
        assert_eq!(
            peer_mode(&snapshot(&mesh), &proxy("web"), 80),
            PeerMode::Strict
        );
        let layered = snapshot(&[mesh.clone(), namespace.clone()].concat());
        assert_eq!(peer_mode(&layered, &proxy("web"), 80), PeerMode::Permissive);
        assert_eq!(peer_mode(&layered, &proxy("web"), 9000), PeerMode::Disable);
        let all = snapshot(&[mesh, namespace, workload].concat());
        assert_eq!(peer_mode(&all, &proxy("web"), 80), PeerMode::Strict);
        assert_eq!(
            peer_mode(&all, &proxy("web"), 9000),
            PeerMode::Strict,
            "a workload policy's own mode beats the namespace's port-level setting"
        );
        assert_eq!(peer_mode(&all, &proxy("db"), 9000), PeerMode::Disable);
    }

    #[test]
    fn mesh_endpoints_get_mtls_and_others_plaintext() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {selector: {app: web}, ports: [{name: http, port: 80}]}\n---\n\
            apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: a, namespace: shop}\nspec: {address: 10.0.0.2, serviceAccount: web-sa, labels: {app: web, security.istio.io/tlsMode: istio}}\n---\n\
            apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: b, namespace: shop}\nspec: {address: 10.0.0.3, labels: {app: web}}\n";
        let snapshot = snapshot(yaml);
        let service = &snapshot.services[0];
        let mut cluster = Cluster::default();
        secure_cluster(&mut cluster, service, 80, None, "cluster.local");
        assert_eq!(cluster.transport_socket_matches.len(), 2);
        let istio = cluster.transport_socket_matches[0]
            .transport_socket
            .clone()
            .unwrap();
        let Some(transport_socket::ConfigType::TypedConfig(any)) = istio.config_type else {
            panic!("typed config");
        };
        let context = <UpstreamTlsContext as prost::Message>::decode(any.value.as_slice()).unwrap();
        assert_eq!(context.sni, "outbound_.80_._.web.shop.svc.cluster.local");
        let Some(common_tls_context::ValidationContextType::CombinedValidationContext(combined)) =
            context.common_tls_context.unwrap().validation_context_type
        else {
            panic!("combined validation");
        };
        let sans = combined
            .default_validation_context
            .unwrap()
            .match_typed_subject_alt_names;
        assert_eq!(
            sans,
            [uri_san("spiffe://cluster.local/ns/shop/sa/web-sa".into())]
        );

        let disable = ClientTlsSettings {
            mode: Some(ClientTlsMode::Disable),
            ..Default::default()
        };
        let mut cluster = Cluster::default();
        secure_cluster(&mut cluster, service, 80, Some(&disable), "cluster.local");
        assert!(cluster.transport_socket_matches.is_empty() && cluster.transport_socket.is_none());
    }
}
