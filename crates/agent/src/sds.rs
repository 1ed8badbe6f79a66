//! Envoy's Secret Discovery Service on a Unix socket: the workload's
//! certificate and key as secret `default` (a `TlsCertificate`) and the mesh
//! root as `ROOTCA` (a `ValidationContext`), inline, never on Envoy's disk —
//! the names Istio's generated configuration refers to.
//!
//! Both protocols are served: state of the world (`StreamSecrets`, what
//! Istio's bootstrap uses) and delta (`DeltaSecrets`), plus `FetchSecrets`.
//! A new certificate is pushed to every stream that asked for it, with a
//! new version. ACKs and NACKs are told apart by nonce; a refused version
//! is not sent again, and requests carrying a stale nonce are ignored.
//! `default` is withheld until the agent has a certificate (Envoy waits).
//!
//! This module does not obtain certificates ([`crate::identity`] does), nor
//! bind or serve the socket ([`crate::agent`] does, through `uds`), nor
//! decide socket paths (the caller does).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::identity::Credentials;

/// The workload certificate's secret name.
pub const DEFAULT_SECRET: &str = "default";
/// The mesh root's secret name.
pub const ROOT_SECRET: &str = "ROOTCA";
/// The type URL of every resource served here.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The SDS service. Cloning is cheap; every stream watches the same
/// credentials.
#[derive(Clone)]
pub struct SdsServer {
    credentials: watch::Receiver<Option<Arc<Credentials>>>,
    root_pem: Arc<str>,
    shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for SdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdsServer").finish_non_exhaustive()
    }
}

impl SdsServer {
    /// Serves `credentials` as `default` and `root_pem` as `ROOTCA`;
    /// streams end when `shutdown` turns true.
    pub fn new(
        credentials: watch::Receiver<Option<Arc<Credentials>>>,
        root_pem: impl Into<Arc<str>>,
        shutdown: watch::Receiver<bool>,
    ) -> SdsServer {
        SdsServer {
            credentials,
            root_pem: root_pem.into(),
            shutdown,
        }
    }

    /// The tonic service, for a server of the caller's.
    pub fn into_service(self) -> SecretDiscoveryServiceServer<SdsServer> {
        SecretDiscoveryServiceServer::new(self)
    }

    fn catalog(&self) -> Catalog {
        Catalog::new(self.credentials.borrow().as_deref(), &self.root_pem)
    }
}

/// One secret as served.
#[derive(Debug, Clone)]
struct Entry {
    version: String,
    any: Any,
}

/// The secrets available now, by name.
#[derive(Debug, Default)]
struct Catalog(BTreeMap<&'static str, Entry>);

fn inline(bytes: impl Into<Vec<u8>>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes.into())),
        ..Default::default()
    })
}

fn fingerprint(parts: impl IntoIterator<Item = impl Hash>) -> String {
    let mut hasher = DefaultHasher::new();
    for part in parts {
        part.hash(&mut hasher);
    }
    format!("{:016x}", hasher.finish())
}

impl Catalog {
    fn new(credentials: Option<&Credentials>, root_pem: &str) -> Catalog {
        let mut out = BTreeMap::new();
        let mut add = |name: &'static str, kind: secret::Type| {
            let any = pack_any(Secret {
                name: name.to_owned(),
                r#type: Some(kind),
            });
            let version = fingerprint([&any.value]);
            out.insert(name, Entry { version, any });
        };
        if let Some(creds) = credentials {
            add(
                DEFAULT_SECRET,
                secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(creds.chain_pem()),
                    private_key: inline(creds.key_pem()),
                    ..Default::default()
                }),
            );
        }
        add(
            ROOT_SECRET,
            secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: inline(root_pem),
                ..Default::default()
            }),
        );
        Catalog(out)
    }

    fn get(&self, name: &str) -> Option<&Entry> {
        self.0.get(name)
    }
}

fn node_id(node: Option<&envoy_types::pb::envoy::config::core::v3::Node>) -> &str {
    node.map_or("", |n| n.id.as_str())
}

/// What a state-of-the-world stream has been sent and asked for.
#[derive(Debug, Default)]
struct Sotw {
    names: BTreeSet<String>,
    nonces: u64,
    /// Nonce and version of the last response.
    sent: Option<(String, String)>,
    /// The last version Envoy refused.
    rejected: Option<String>,
}

impl Sotw {
    /// Handles a request; returns a response to send, if any.
    fn on_request(
        &mut self,
        request: DiscoveryRequest,
        catalog: &Catalog,
    ) -> Option<DiscoveryResponse> {
        let nonce = request.response_nonce.as_str();
        if !nonce.is_empty() && self.sent.as_ref().map(|(n, _)| n.as_str()) != Some(nonce) {
            tracing::debug!(nonce, "SDS request with a stale nonce ignored");
            return None;
        }
        if let Some(error) = &request.error_detail {
            tracing::warn!(node = node_id(request.node.as_ref()), version = %request.version_info, names = ?request.resource_names, "Envoy refused secrets: {}", error.message);
            self.rejected = self.sent.as_ref().map(|(_, v)| v.clone());
        } else if !nonce.is_empty() {
            tracing::debug!(version = %request.version_info, "Envoy accepted secrets");
        }
        let names: BTreeSet<String> = request.resource_names.into_iter().collect();
        if names != self.names {
            self.names = names;
            return self.push(catalog, true);
        }
        None
    }

    /// The response for the current subscription, unless it would repeat
    /// the last one (or one Envoy refused). `force` answers a changed
    /// subscription even when nothing is new.
    fn push(&mut self, catalog: &Catalog, force: bool) -> Option<DiscoveryResponse> {
        let entries: Vec<(&String, &Entry)> = self
            .names
            .iter()
            .filter_map(|name| Some((name, catalog.get(name)?)))
            .collect();
        if entries.is_empty() {
            return None;
        }
        let version = fingerprint(
            entries
                .iter()
                .map(|(n, e)| (n.as_str(), e.version.as_str())),
        );
        let last = self.sent.as_ref().map(|(_, v)| v);
        if !force && (last == Some(&version) || self.rejected.as_ref() == Some(&version)) {
            return None;
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        self.sent = Some((nonce.clone(), version.clone()));
        Some(DiscoveryResponse {
            version_info: version,
            resources: entries.into_iter().map(|(_, e)| e.any.clone()).collect(),
            type_url: SECRET_TYPE.to_owned(),
            nonce,
            ..Default::default()
        })
    }
}

/// What a delta stream has been sent and asked for.
#[derive(Debug, Default)]
struct Delta {
    started: bool,
    subscribed: BTreeSet<String>,
    /// What Envoy has (or said it had): name → version.
    known: BTreeMap<String, String>,
    /// Versions Envoy refused, by name.
    rejected: BTreeMap<String, String>,
    nonces: u64,
    /// Responses not yet answered: nonce → what they carried.
    outstanding: HashMap<String, Vec<(String, String)>>,
}

impl Delta {
    fn on_request(
        &mut self,
        request: DeltaDiscoveryRequest,
        catalog: &Catalog,
    ) -> Option<DeltaDiscoveryResponse> {
        if !self.started {
            self.started = true;
            self.known = request
                .initial_resource_versions
                .clone()
                .into_iter()
                .collect();
        }
        if !request.response_nonce.is_empty() {
            match self.outstanding.remove(&request.response_nonce) {
                Some(carried) => {
                    if let Some(error) = &request.error_detail {
                        tracing::warn!(
                            node = node_id(request.node.as_ref()),
                            "Envoy refused secrets: {}",
                            error.message
                        );
                        for (name, version) in carried {
                            if self.known.get(&name) == Some(&version) {
                                self.known.remove(&name);
                            }
                            self.rejected.insert(name, version);
                        }
                    }
                }
                None => {
                    tracing::debug!(nonce = %request.response_nonce, "delta SDS answer to an unknown nonce")
                }
            }
        }
        for name in request.resource_names_unsubscribe {
            self.subscribed.remove(&name);
            self.known.remove(&name);
        }
        self.subscribed.extend(
            request
                .resource_names_subscribe
                .into_iter()
                .filter(|n| n != "*"),
        );
        self.push(catalog)
    }

    fn push(&mut self, catalog: &Catalog) -> Option<DeltaDiscoveryResponse> {
        let mut resources = Vec::new();
        for name in &self.subscribed {
            let Some(entry) = catalog.get(name) else {
                continue;
            };
            if self.known.get(name) == Some(&entry.version)
                || self.rejected.get(name) == Some(&entry.version)
            {
                continue;
            }
            resources.push(Resource {
                name: name.clone(),
                version: entry.version.clone(),
                resource: Some(entry.any.clone()),
                ..Default::default()
            });
        }
        if resources.is_empty() {
            return None;
        }
        let carried: Vec<(String, String)> = resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        for (name, version) in &carried {
            self.known.insert(name.clone(), version.clone());
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        // Envoy answers every response; bound the bookkeeping anyway.
        if self.outstanding.len() > 64 {
            self.outstanding.clear();
        }
        self.outstanding.insert(nonce.clone(), carried);
        Some(DeltaDiscoveryResponse {
            system_version_info: fingerprint(resources.iter().map(|r| &r.version)),
            resources,
            type_url: SECRET_TYPE.to_owned(),
            nonce,
            ..Default::default()
        })
    }
}

/// The request/response pairing of one protocol, so both share one loop.
trait Protocol: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    fn type_url(request: &Self::Request) -> &str;
    fn on_request(&mut self, request: Self::Request, catalog: &Catalog) -> Option<Self::Response>;
    fn on_change(&mut self, catalog: &Catalog) -> Option<Self::Response>;
}

impl Protocol for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    fn type_url(request: &DiscoveryRequest) -> &str {
        &request.type_url
    }
    fn on_request(
        &mut self,
        request: DiscoveryRequest,
        catalog: &Catalog,
    ) -> Option<DiscoveryResponse> {
        Sotw::on_request(self, request, catalog)
    }
    fn on_change(&mut self, catalog: &Catalog) -> Option<DiscoveryResponse> {
        self.push(catalog, false)
    }
}

impl Protocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    fn type_url(request: &DeltaDiscoveryRequest) -> &str {
        &request.type_url
    }
    fn on_request(
        &mut self,
        request: DeltaDiscoveryRequest,
        catalog: &Catalog,
    ) -> Option<DeltaDiscoveryResponse> {
        Delta::on_request(self, request, catalog)
    }
    fn on_change(&mut self, catalog: &Catalog) -> Option<DeltaDiscoveryResponse> {
        self.push(catalog)
    }
}

impl SdsServer {
    /// Runs one stream in a task of its own; the returned receiver is the
    /// response stream.
    fn stream<P: Protocol>(
        &self,
        mut protocol: P,
        mut requests: Streaming<P::Request>,
    ) -> ReceiverStream<Result<P::Response, Status>>
    where
        P::Request: prost::Message + Default,
    {
        let (tx, rx) = mpsc::channel(4);
        let server = self.clone();
        let mut credentials = self.credentials.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut watching = true;
            loop {
                let reply = tokio::select! {
                    () = crate::stopped(&mut shutdown) => break,
                    () = tx.closed() => break,
                    changed = credentials.changed(), if watching => {
                        if changed.is_err() {
                            watching = false;
                            continue;
                        }
                        protocol.on_change(&server.catalog())
                    }
                    request = requests.message() => match request {
                        Ok(Some(request)) => {
                            let type_url = P::type_url(&request);
                            if !type_url.is_empty() && type_url != SECRET_TYPE {
                                let status = Status::invalid_argument(format!("this SDS server serves only {SECRET_TYPE}, not {type_url}"));
                                let _ = tx.send(Err(status)).await;
                                break;
                            }
                            // Mark the current value seen: it is what this
                            // answer is built from.
                            credentials.borrow_and_update();
                            protocol.on_request(request, &server.catalog())
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "SDS stream ended");
                            break;
                        }
                    },
                };
                if let Some(response) = reply
                    && tx.send(Ok(response)).await.is_err()
                {
                    break;
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsServer {
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Ok(Response::new(
            self.stream(Delta::default(), request.into_inner()),
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        Ok(Response::new(
            self.stream(Sotw::default(), request.into_inner()),
        ))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let mut sotw = Sotw::default();
        let mut request = request.into_inner();
        request.response_nonce.clear();
        request.error_detail = None;
        sotw.on_request(request, &self.catalog())
            .map(Response::new)
            .ok_or_else(|| Status::unavailable("none of the requested secrets is available yet"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use prost::Message;

    fn catalog(cert: Option<(&str, &str)>) -> Catalog {
        let mut out = Catalog::new(None, "ROOT PEM");
        if let Some((chain, key)) = cert {
            let any = pack_any(Secret {
                name: DEFAULT_SECRET.into(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(chain),
                    private_key: inline(key),
                    ..Default::default()
                })),
            });
            out.0.insert(
                DEFAULT_SECRET,
                Entry {
                    version: fingerprint([&any.value]),
                    any,
                },
            );
        }
        out
    }

    fn request(names: &[&str], nonce: &str, nack: bool) -> DiscoveryRequest {
        DiscoveryRequest {
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: SECRET_TYPE.into(),
            response_nonce: nonce.into(),
            error_detail: nack.then(|| RpcStatus {
                code: 3,
                message: "bad".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn secrets(response: &DiscoveryResponse) -> Vec<Secret> {
        response
            .resources
            .iter()
            .map(|any| {
                assert_eq!(any.type_url, SECRET_TYPE);
                Secret::decode(any.value.as_slice()).unwrap()
            })
            .collect()
    }

    #[test]
    fn catalog_holds_inline_certificate_and_root() {
        let c = catalog(Some(("CHAIN", "KEY")));
        let Some(secret::Type::TlsCertificate(tls)) =
            Secret::decode(c.get(DEFAULT_SECRET).unwrap().any.value.as_slice())
                .unwrap()
                .r#type
        else {
            panic!("default is a TLS certificate");
        };
        assert_eq!(
            tls.certificate_chain.unwrap().specifier,
            Some(Specifier::InlineBytes(b"CHAIN".to_vec()))
        );
        assert_eq!(
            tls.private_key.unwrap().specifier,
            Some(Specifier::InlineBytes(b"KEY".to_vec()))
        );
        let Some(secret::Type::ValidationContext(ctx)) =
            Secret::decode(c.get(ROOT_SECRET).unwrap().any.value.as_slice())
                .unwrap()
                .r#type
        else {
            panic!("ROOTCA is a validation context");
        };
        assert_eq!(
            ctx.trusted_ca.unwrap().specifier,
            Some(Specifier::InlineBytes(b"ROOT PEM".to_vec()))
        );
        assert!(catalog(None).get(DEFAULT_SECRET).is_none());
    }

    #[test]
    fn state_of_the_world_acks_nacks_and_stale_nonces() {
        let mut s = Sotw::default();
        // No certificate yet: nothing for `default`.
        assert!(
            s.on_request(request(&["default"], "", false), &catalog(None))
                .is_none()
        );
        let first = s.on_change(&catalog(Some(("A", "ka")))).unwrap();
        assert_eq!(secrets(&first)[0].name, "default");
        // ACK: nothing more until something changes.
        assert!(
            s.on_request(
                request(&["default"], &first.nonce, false),
                &catalog(Some(("A", "ka")))
            )
            .is_none()
        );
        assert!(s.on_change(&catalog(Some(("A", "ka")))).is_none());
        // Rotation: a new version.
        let second = s.on_change(&catalog(Some(("B", "kb")))).unwrap();
        assert_ne!(second.version_info, first.version_info);
        assert_ne!(second.nonce, first.nonce);
        // A stale nonce, even with new names, is ignored.
        assert!(
            s.on_request(
                request(&["default", "ROOTCA"], &first.nonce, false),
                &catalog(Some(("B", "kb")))
            )
            .is_none()
        );
        // NACK: the refused version is not sent again; the next one is.
        assert!(
            s.on_request(
                request(&["default"], &second.nonce, true),
                &catalog(Some(("B", "kb")))
            )
            .is_none()
        );
        assert!(s.on_change(&catalog(Some(("B", "kb")))).is_none());
        let third = s.on_change(&catalog(Some(("C", "kc")))).unwrap();
        assert_ne!(third.version_info, second.version_info);
        // A new subscription is answered at once, with both secrets.
        let both = s
            .on_request(
                request(&["default", "ROOTCA"], &third.nonce, false),
                &catalog(Some(("C", "kc"))),
            )
            .unwrap();
        let names: Vec<String> = secrets(&both).into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["ROOTCA", "default"]);
        // Unknown names get nothing.
        let mut other = Sotw::default();
        assert!(
            other
                .on_request(request(&["file-cert:/x"], "", false), &catalog(None))
                .is_none()
        );
    }

    #[test]
    fn delta_sends_only_what_changed_and_honours_initial_versions() {
        let with_a = catalog(Some(("A", "ka")));
        let mut d = Delta::default();
        let first = d
            .on_request(
                DeltaDiscoveryRequest {
                    type_url: SECRET_TYPE.into(),
                    resource_names_subscribe: vec!["default".into(), "ROOTCA".into()],
                    initial_resource_versions: [(
                        "ROOTCA".to_string(),
                        with_a.get(ROOT_SECRET).unwrap().version.clone(),
                    )]
                    .into(),
                    ..Default::default()
                },
                &with_a,
            )
            .unwrap();
        let names: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["default"], "Envoy already has this ROOTCA");
        let ack = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            response_nonce: first.nonce.clone(),
            ..Default::default()
        };
        assert!(d.on_request(ack, &with_a).is_none());
        assert!(d.on_change(&with_a).is_none());
        let with_b = catalog(Some(("B", "kb")));
        let second = d.on_change(&with_b).unwrap();
        assert_eq!(second.resources.len(), 1);
        assert_eq!(second.resources[0].name, "default");
        // NACK: not re-sent until it changes again.
        let nack = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            response_nonce: second.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "no".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(d.on_request(nack, &with_b).is_none());
        assert!(d.on_change(&with_b).is_none());
        assert!(d.on_change(&catalog(Some(("C", "kc")))).is_some());
        // Unsubscribed names are no longer pushed.
        let unsub = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            resource_names_unsubscribe: vec!["default".into()],
            ..Default::default()
        };
        assert!(d.on_request(unsub, &with_b).is_none());
        assert!(d.on_change(&catalog(Some(("D", "kd")))).is_none());
    }
}
