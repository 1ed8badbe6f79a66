//! The one HTTP client the commands use to talk to the control plane: its
//! config API ([`Client::config_api`], `VMESH_SERVER` and `VMESH_TOKEN`)
//! and its monitoring port ([`Client::monitoring`], `VMESH_MONITORING`).
//!
//! One timeout policy ([`CONNECT_TIMEOUT`], [`REQUEST_TIMEOUT`]) and one
//! error shape ([`ApiError`]): every request is named by its caller (what
//! it was for), and a refusal carries the server's reason and message.
//! Answers are JSON values; typed where the shape is the server's own
//! ([`Client::mesh_settings`], [`proxy_statuses`]).
//!
//! It does not speak to VMs (`vmesh agent join` pins and trusts the mesh
//! root itself, [`crate::join`]) nor to an agent's status port.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use vmesh_api::mesh::MeshSettings;

use crate::Connection;

/// How long connecting to the server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request failed; each names the request it was.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("building the HTTP client")]
    Build(#[source] reqwest::Error),
    #[error("reading the CA certificate {}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: cannot reach {server} ({hint})")]
    Unreachable {
        what: String,
        server: String,
        hint: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: reading the answer of {server} ({code})")]
    Answer {
        what: String,
        server: String,
        code: StatusCode,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: Error from server ({reason}): {message}")]
    Refused {
        what: String,
        code: StatusCode,
        reason: String,
        message: String,
    },
    #[error("{what}: the answer of {server} is not what was expected")]
    Unexpected {
        what: String,
        server: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A client of one of the server's HTTP ports.
#[derive(Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    /// The server, for messages: "the vmesh server at …".
    server: String,
    /// How to point the CLI at another server.
    hint: &'static str,
}

impl Client {
    /// The config API at `connection`.
    pub fn config_api(connection: &Connection) -> Result<Client, ApiError> {
        let base = connection.server.trim_end_matches('/').to_string();
        let ca = match &connection.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|source| ApiError::CaFile {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        Client::new(
            format!("the vmesh server at {base}"),
            base,
            connection.token.clone(),
            ca.as_deref(),
            "set VMESH_SERVER or --server",
        )
    }

    /// The monitoring port at `url`.
    pub fn monitoring(url: &str) -> Result<Client, ApiError> {
        let base = url.trim_end_matches('/').to_string();
        Client::new(
            format!("the server's monitoring port at {base}"),
            base,
            None,
            None,
            "set --monitoring or VMESH_MONITORING",
        )
    }

    /// A client of `base`; an https:// server is trusted by `ca` (PEM) alone.
    fn new(
        server: String,
        base: String,
        token: Option<String>,
        ca: Option<&[u8]>,
        hint: &'static str,
    ) -> Result<Client, ApiError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        if let Some(pem) = ca {
            for certificate in
                reqwest::Certificate::from_pem_bundle(pem).map_err(ApiError::Build)?
            {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder.build().map_err(ApiError::Build)?;
        Ok(Client {
            base,
            token,
            http,
            server,
            hint,
        })
    }

    /// "the vmesh server at …", for messages.
    pub fn server(&self) -> &str {
        &self.server
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(&self, request: RequestBuilder, what: &str) -> Result<Value, ApiError> {
        let response = request
            .send()
            .await
            .map_err(|source| ApiError::Unreachable {
                what: what.to_string(),
                server: self.server.clone(),
                hint: self.hint,
                source,
            })?;
        let code = response.status();
        let text = response.text().await.map_err(|source| ApiError::Answer {
            what: what.to_string(),
            server: self.server.clone(),
            code,
            source,
        })?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if code.is_success() {
            return Ok(body);
        }
        let reason = body["reason"]
            .as_str()
            .or(code.canonical_reason())
            .unwrap_or("Error");
        let message = body["message"]
            .as_str()
            .or(body.as_str().filter(|text| !text.is_empty()))
            .unwrap_or("no message");
        Err(ApiError::Refused {
            what: what.to_string(),
            code,
            reason: reason.to_string(),
            message: message.to_string(),
        })
    }

    /// `GET path`.
    pub async fn get(&self, path: &str, what: &str) -> Result<Value, ApiError> {
        self.send(self.request(Method::GET, path), what).await
    }

    /// `GET path`, `None` when the server has no such object.
    pub async fn find(&self, path: &str, what: &str) -> Result<Option<Value>, ApiError> {
        match self.get(path, what).await {
            Ok(value) => Ok(Some(value)),
            Err(ApiError::Refused {
                code: StatusCode::NOT_FOUND,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value, what: &str) -> Result<Value, ApiError> {
        self.send(self.request(Method::POST, path).json(body), what)
            .await
    }

    /// `PUT path` with a JSON body (a whole object, replaced).
    pub async fn put(&self, path: &str, body: &Value, what: &str) -> Result<Value, ApiError> {
        self.send(self.request(Method::PUT, path).json(body), what)
            .await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str, what: &str) -> Result<Value, ApiError> {
        self.send(self.request(Method::DELETE, path), what).await
    }

    /// The mesh settings of `revision` (the default revision's without one),
    /// as the server resolves them from its IstioOperators.
    pub async fn mesh_settings(&self, revision: Option<&str>) -> Result<MeshSettings, ApiError> {
        let what = "reading the mesh settings";
        let mut request = self.request(Method::GET, vmesh_server::api::MESH_PATH);
        if let Some(revision) = revision {
            request = request.query(&[("revision", revision)]);
        }
        self.send_typed(request, what).await
    }

    async fn send_typed<T: DeserializeOwned>(
        &self,
        request: RequestBuilder,
        what: &str,
    ) -> Result<T, ApiError> {
        let answer = self.send(request, what).await?;
        serde_json::from_value(answer).map_err(|source| ApiError::Unexpected {
            what: what.to_string(),
            server: self.server.clone(),
            source,
        })
    }
}

/// Every connected proxy and its sync status, from the monitoring port at
/// `monitoring` (`/debug/syncz`).
pub async fn proxy_statuses(monitoring: &str) -> Result<Vec<Value>, ApiError> {
    let client = Client::monitoring(monitoring)?;
    client
        .send_typed(
            client.request(Method::GET, "/debug/syncz"),
            "reading the proxies' sync status",
        )
        .await
}
