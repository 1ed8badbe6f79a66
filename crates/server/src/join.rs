//! One-line VM join, the bootstrap the guide's cloud-init expects.
//!
//! An operator registers a join token for a WorkloadGroup through the
//! config API, handing over the group's onboarding files (everything `vmesh
//! workload entry configure` writes except the bootstrap token). A VM then
//! calls `GET /v1/vm/bootstrap` on the TLS port (15012) with
//! `Authorization: Bearer <join token>` and gets those files as a tar.gz,
//! with a fresh `istio-token` for the group's service account. It first
//! fetches the root from `GET /v1/vm/root-cert` and checks it against the
//! hash it was given, so the TLS connection that carries the token is to
//! this mesh.
//!
//! A join token is `<id>.<secret>`: the store keeps its id, a SHA-256 of the
//! secret, its expiry and how many joins it has left, as a server-owned
//! record (`join/<id>`) that the config API can neither read nor write. Each
//! join spends one use; spent, expired and revoked tokens are refused, each
//! with its reason, and their records are deleted a day after they expire
//! (an unknown token is refused too). The bootstrap token a join mints
//! descends from the join token (its id is `<join id>.<uuid>`), and so does
//! every certificate issued with it: revoking a join token revokes all of
//! them. The service account is the group's, read by the server, never the
//! caller's word.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use vmesh_api::ObjectKey;
use vmesh_api::onboarding;
use vmesh_store::{Store, StoreError};

use crate::identity::{Identity, problem, sha256_hex};

/// The bootstrap endpoint on the TLS port.
pub const BOOTSTRAP_PATH: &str = "/v1/vm/bootstrap";
/// The mesh root, public, for pinning before the token is sent.
pub const ROOT_PATH: &str = "/v1/vm/root-cert";
const RECORD_PREFIX: &str = "join/";
/// The bootstrap token, the one bundle file a join makes itself, per join.
const TOKEN_FILE: &str = onboarding::TOKEN.name;

/// The files a join is given: the whole bundle but its token.
fn required_files() -> impl Iterator<Item = &'static str> {
    onboarding::BUNDLE
        .into_iter()
        .map(|file| file.name)
        .filter(|name| *name != TOKEN_FILE)
}
pub(crate) const MAX_JOIN_LIFE: Duration = Duration::from_secs(30 * 24 * 3600);
const MAX_USES: u32 = 100_000;

/// What the store keeps about one join token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JoinRecord {
    namespace: String,
    group: String,
    service_account: String,
    secret_sha256: String,
    /// Unix seconds.
    expires: u64,
    uses_left: u32,
    token_seconds: u64,
    files: BTreeMap<String, String>,
}

/// `POST …/workloadgroups/{group}/jointokens`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinRequest {
    /// How many VMs may join with it (default 1).
    uses: Option<u32>,
    /// How long it may be used (default 1 h).
    duration_seconds: Option<u64>,
    /// The life of each joining VM's bootstrap token (default 1 h).
    token_duration_seconds: Option<u64>,
    files: BTreeMap<String, String>,
}

/// `POST …/workloadgroups/{group}/jointokens/revoke`: one (`id`) or all.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeJoinRequest {
    id: Option<String>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The live join records, by id. A record that does not decode is logged
/// and skipped: it can only be damage.
fn records(store: &Store) -> Result<Vec<(String, JoinRecord)>, StoreError> {
    Ok(store
        .records(RECORD_PREFIX)?
        .into_iter()
        .filter_map(|(name, bytes)| {
            let id = name.strip_prefix(RECORD_PREFIX)?.to_string();
            match serde_json::from_slice(&bytes) {
                Ok(record) => Some((id, record)),
                Err(e) => {
                    tracing::error!(%id, "join record unreadable, ignored: {e}");
                    None
                }
            }
        })
        .collect())
}

/// A join record as stored (the bytes a use is spent against) and decoded.
fn record(store: &Store, id: &str) -> Result<Option<(Vec<u8>, JoinRecord)>, StoreError> {
    let Some(bytes) = store.record(&format!("{RECORD_PREFIX}{id}"))? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::error!(%id, "join record unreadable, ignored: {e}"))
        .ok()
        .map(|record| (bytes, record)))
}

/// A record written (`Some`) or deleted (`None`).
fn record_write(id: &str, record: Option<&JoinRecord>) -> (String, Option<Vec<u8>>) {
    (
        format!("{RECORD_PREFIX}{id}"),
        record.map(|r| serde_json::to_vec(r).expect("a join record serialises")),
    )
}

/// How long a join token's record outlives the token, so that a late VM
/// hears "expired" rather than "unknown".
const EXPIRED_RECORD_KEPT: Duration = Duration::from_secs(24 * 3600);

/// Deletes the records of tokens expired for more than [`EXPIRED_RECORD_KEPT`].
fn expire_records(store: &Store) -> Result<(), StoreError> {
    let horizon = unix_now().saturating_sub(EXPIRED_RECORD_KEPT.as_secs());
    let expired: Vec<_> = records(store)?
        .into_iter()
        .filter(|(_, record)| record.expires <= horizon)
        .map(|(id, _)| record_write(&id, None))
        .collect();
    if !expired.is_empty() {
        tracing::info!(count = expired.len(), "expired join tokens forgotten");
        store.write_records(expired)?;
    }
    Ok(())
}

/// The group's service account, from the store.
fn group_account(
    identity: &Identity,
    namespace: &str,
    group: &str,
) -> Result<String, (StatusCode, String)> {
    let key = ObjectKey {
        group: "networking.istio.io".into(),
        plural: "workloadgroups".into(),
        namespace: namespace.into(),
        name: group.into(),
    };
    match identity.store().get(&key) {
        Ok(Some(object)) => Ok(object
            .body
            .get("spec")
            .and_then(|s| s.get("template"))
            .and_then(|t| t.get("serviceAccount"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string()),
        Ok(None) => Err((
            StatusCode::NOT_FOUND,
            format!("WorkloadGroup {namespace}/{group} does not exist"),
        )),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

pub async fn create(
    State(identity): State<Arc<Identity>>,
    Path((namespace, group)): Path<(String, String)>,
    Json(request): Json<JoinRequest>,
) -> Response {
    let account = match group_account(&identity, &namespace, &group) {
        Ok(account) => account,
        Err((code, message)) => return problem(code, message),
    };
    let uses = request.uses.unwrap_or(1);
    if uses == 0 || uses > MAX_USES {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("uses {uses} is out of range: 1 to {MAX_USES}"),
        );
    }
    let life = request.duration_seconds.unwrap_or(3600);
    let token_life = request.token_duration_seconds.unwrap_or(3600);
    for (field, seconds) in [
        ("durationSeconds", life),
        ("tokenDurationSeconds", token_life),
    ] {
        if seconds == 0 || seconds > MAX_JOIN_LIFE.as_secs() {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "{field} {seconds} is out of range: 1 to {}",
                    MAX_JOIN_LIFE.as_secs()
                ),
            );
        }
    }
    let missing: Vec<&str> = required_files()
        .filter(|name| !request.files.contains_key(*name))
        .collect();
    if !missing.is_empty() {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("files: missing {}", missing.join(", ")),
        );
    }
    if let Some(extra) = request
        .files
        .keys()
        .find(|name| !required_files().any(|required| required == name.as_str()))
    {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "files: {extra:?} is not an onboarding file (the bootstrap token is made per join)"
            ),
        );
    }
    let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let record = JoinRecord {
        namespace: namespace.clone(),
        group: group.clone(),
        service_account: account,
        secret_sha256: sha256_hex(&secret),
        expires: unix_now() + life,
        uses_left: uses,
        token_seconds: token_life,
        files: request.files,
    };
    let stored = expire_records(identity.store()).and_then(|()| {
        identity
            .store()
            .write_records(vec![record_write(&id, Some(&record))])
    });
    if let Err(e) = stored {
        return crate::api::store_problem(&e);
    }
    let ca_hash = match vmesh_ca::root_hash(identity.authority.root_pem()) {
        Ok(hash) => hash,
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    tracing::info!(%namespace, %group, %id, uses, "join token created");
    Json(json!({
        "token": format!("{id}.{secret}"),
        "id": id,
        "uses": uses,
        "expires": humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(record.expires)).to_string(),
        "caHash": ca_hash,
    }))
    .into_response()
}

pub async fn revoke(
    State(identity): State<Arc<Identity>>,
    Path((namespace, group)): Path<(String, String)>,
    request: Option<Json<RevokeJoinRequest>>,
) -> Response {
    if let Err((code, message)) = group_account(&identity, &namespace, &group) {
        return problem(code, message);
    }
    let id = request.and_then(|r| r.0.id);
    let revocations = identity.revocations().borrow().clone();
    let chosen: Vec<String> = match records(identity.store()) {
        Ok(records) => records
            .into_iter()
            .filter(|(record_id, record)| {
                id.as_deref().is_none_or(|id| id == record_id)
                    && record.namespace == namespace
                    && record.group == group
                    && !revocations.is_lineage_revoked(record_id)
            })
            .map(|(record_id, _)| record_id)
            .collect(),
        Err(e) => return crate::api::store_problem(&e),
    };
    if let Some(id) = &id
        && chosen.is_empty()
    {
        return problem(
            StatusCode::NOT_FOUND,
            format!("no live join token {id} for WorkloadGroup {namespace}/{group}"),
        );
    }
    // Revoking the ids revokes their lineage: the tokens joins minted from
    // them and every certificate issued with those.
    let revoked = identity.change_revocations(|revocations| {
        for record_id in &chosen {
            revocations.revoke_token(record_id.clone());
        }
    });
    if let Err(e) = revoked {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let count = chosen.len();
    tracing::info!(%namespace, %group, count, "join tokens revoked with everything issued from them");
    Json(json!({"revoked": count})).into_response()
}

pub async fn root_cert(State(identity): State<Arc<Identity>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        identity.authority.root_pem().to_string(),
    )
        .into_response()
}

/// Why a join was refused; said to the caller in few words.
fn refuse(why: &str) -> Response {
    tracing::warn!("VM join refused: {why}");
    problem(StatusCode::UNAUTHORIZED, format!("join refused: {why}"))
}

/// `GET` of a VM's onboarding files with a join token. A source that keeps
/// presenting bad tokens is turned away (429) before its guesses are
/// checked ([`crate::throttle`]).
pub async fn bootstrap(
    State(identity): State<Arc<Identity>>,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
) -> Response {
    let source = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.get_ref().remote_addr())
        .map(|addr| addr.ip());
    if let Some(source) = source
        && let Err(wait) = identity.join_failures.admit(source, "VM joins")
    {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, wait.as_secs().max(1).to_string())],
            format!(
                "join refused: too many failed joins from {source}; try again in {} s\n",
                wait.as_secs().max(1)
            ),
        )
            .into_response();
    }
    let response = join(&identity, &headers).await;
    if let Some(source) = source
        && response.status() == StatusCode::UNAUTHORIZED
    {
        identity.join_failures.failed(source);
    }
    response
}

async fn join(identity: &Arc<Identity>, headers: &HeaderMap) -> Response {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return refuse("no join token (Authorization: Bearer <token>)");
    };
    let Some((id, secret)) = token.trim().split_once('.') else {
        return refuse("not a join token");
    };
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return refuse("not a join token");
    }
    // One join at a time spends uses here, and the use is written only
    // over the record it was read from, so two VMs cannot share the last
    // one even through two servers.
    let _spending = identity.joining.lock().await;
    for _ in 0..SPEND_ATTEMPTS {
        match spend_use(identity, id, secret) {
            Spent::Raced => continue,
            Spent::Done(response) => return response,
        }
    }
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "the join token is being used elsewhere right now: try again".into(),
    )
}

/// How many times a join reads its token's record again after another
/// server spent a use of it meanwhile.
const SPEND_ATTEMPTS: usize = 8;

enum Spent {
    /// Another server wrote the record between our read and our write.
    Raced,
    Done(Response),
}

fn spend_use(identity: &Arc<Identity>, id: &str, secret: &str) -> Spent {
    let refuse = |why: &str| Spent::Done(refuse(why));
    let (read, mut record) = match record(identity.store(), id) {
        Ok(Some(found)) => found,
        Ok(None) => return refuse("unknown join token"),
        Err(e) => return Spent::Done(crate::api::store_problem(&e)),
    };
    let presented = sha256_hex(secret);
    if !bool::from(presented.as_bytes().ct_eq(record.secret_sha256.as_bytes())) {
        return refuse("unknown join token");
    }
    if identity.revocations().borrow().is_lineage_revoked(id) {
        return refuse("the join token was revoked");
    }
    if unix_now() >= record.expires {
        return refuse("the join token expired");
    }
    if record.uses_left == 0 {
        return refuse("the join token is used up");
    }
    let issued = match identity.issuer.issue_from(
        id,
        &record.namespace,
        &record.service_account,
        Duration::from_secs(record.token_seconds),
    ) {
        Ok(issued) => issued,
        Err(e) => {
            return Spent::Done(problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
        }
    };
    record.uses_left -= 1;
    let (name, spent) = record_write(id, Some(&record));
    match identity.store().swap_record(&name, Some(&read), spent) {
        Ok(true) => {}
        Ok(false) => return Spent::Raced,
        Err(e) => return Spent::Done(crate::api::store_problem(&e)),
    }
    let mut files = record.files.clone();
    files.insert(TOKEN_FILE.into(), issued.token);
    let archive = match archive(&files) {
        Ok(archive) => archive,
        Err(e) => {
            return Spent::Done(problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
        }
    };
    tracing::info!(
        namespace = %record.namespace,
        group = %record.group,
        %id,
        uses_left = record.uses_left,
        "VM joined with a join token"
    );
    Spent::Done(
        (
            [
                (header::CONTENT_TYPE, "application/gzip"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"onboarding.tar.gz\"",
                ),
            ],
            archive,
        )
            .into_response(),
    )
}

/// The files as a tar.gz, each with the mode install.sh expects to find.
fn archive(files: &BTreeMap<String, String>) -> std::io::Result<Vec<u8>> {
    let gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gzip);
    for (name, contents) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(onboarding::BundleFile::named(name).map_or(0o644, |file| file.mode));
        header.set_mtime(unix_now());
        header.set_cksum();
        tar.append_data(&mut header, name, contents.as_bytes())?;
    }
    tar.into_inner()?.finish()
}
