//! The config API client the CLI commands share.

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::Connection;

pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(connection: &Connection) -> Client {
        Client {
            base: connection.server.trim_end_matches('/').to_string(),
            token: connection.token.clone(),
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.with_context(|| {
            format!(
                "cannot reach the vmesh server at {} (set VMESH_SERVER)",
                self.base
            )
        })?;
        let code = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("reading the server's answer ({code})"))?;
        if !code.is_success() {
            let reason = body["reason"].as_str().unwrap_or("Error");
            let message = body["message"].as_str().unwrap_or("no message");
            bail!("Error from server ({reason}): {message}");
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }
}
