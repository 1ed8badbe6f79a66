//! The etcd backend: the store in etcd v3, shared by every server connected
//! to the same etcd and key prefix.
//!
//! This module owns the key layout, the optimistic commit and the follower
//! that feeds every server's change history from etcd; what a write means is
//! [`crate::batch`]'s. Under the prefix (`/vmesh/` unless the URL names
//! another):
//!
//! - `revision`: the store's revision counter. Every batch reads it, applies
//!   itself on a snapshot of that etcd revision, and commits in one etcd
//!   transaction only if the counter has not moved (else it starts again), so
//!   batches are serialized across servers exactly as the embedded store
//!   serializes them in one process, and resourceVersions are the same
//!   numbers on every server.
//! - `objects/<storage key>`: each object, as JSON, resourceVersion included.
//! - `log/<last revision, 20 digits>`: each batch's changes, in order; the
//!   last [`crate::HISTORY`] revisions' worth are kept. Every server follows
//!   this prefix (a read of what it lacks, then an etcd watch) into its own
//!   history, so a write through any server reaches watches and proxies on
//!   all of them, and a deleted object's last version travels with it.
//! - `records/<name>`: server-owned records.
//!
//! The store's API is synchronous (the embedded store is), so each call runs
//! on this backend's own small runtime and the caller waits for it, with a
//! time limit: an etcd that has lost quorum makes calls fail with
//! [`StoreError::Unavailable`], never hang.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, GetResponse, Txn, TxnOp,
    WatchOptions,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use vmesh_api::{Object, ObjectKey};

use crate::batch::{self, Txn as BatchTxn};
use crate::{BatchError, EventType, HISTORY, History, Outcome, StoreError, WatchEvent};

/// Where a server keeps its objects (`vmesh server --store`).
#[derive(Debug, Clone, PartialEq)]
pub enum StoreLocation {
    /// The embedded redb file in this directory.
    Embedded(PathBuf),
    Etcd(EtcdConfig),
}

impl StoreLocation {
    /// `redb:` (or nothing) for the embedded store under `data_dir`, or
    /// `etcd://host:port[,host:port…][/prefix]`.
    pub fn parse(url: Option<&str>, data_dir: &Path) -> Result<StoreLocation, String> {
        match url.map(str::trim) {
            None | Some("" | "redb:" | "redb") => {
                Ok(StoreLocation::Embedded(data_dir.to_path_buf()))
            }
            Some(url) => match url.strip_prefix("etcd://") {
                Some(rest) => EtcdConfig::parse(rest).map(StoreLocation::Etcd),
                None => Err(format!(
                    "--store {url:?}: expected redb: (the embedded store) or etcd://host:port[,host:port…][/prefix]"
                )),
            },
        }
    }
}

/// How to reach etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// The key prefix, `/vmesh/` by default: several meshes can share one etcd.
    pub prefix: String,
    /// Client TLS; plaintext when none.
    pub tls: Option<EtcdTls>,
    /// How long one call may take before the store counts as unavailable.
    pub timeout: Duration,
}

/// Client TLS towards etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdTls {
    /// The CA that signed etcd's serving certificates.
    pub ca: PathBuf,
    /// A client certificate and its key, for an etcd that asks for one.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl EtcdConfig {
    fn parse(rest: &str) -> Result<EtcdConfig, String> {
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { "vmesh" } else { prefix };
        let mut endpoints = Vec::new();
        for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            let port_ok = host
                .rsplit_once(':')
                .is_some_and(|(name, port)| !name.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(format!("--store etcd://{rest}: {host:?} is not host:port"));
            }
            endpoints.push(host.to_string());
        }
        if endpoints.is_empty() {
            return Err(format!("--store etcd://{rest}: no etcd member named"));
        }
        Ok(EtcdConfig {
            endpoints,
            prefix: format!("/{prefix}/"),
            tls: None,
            timeout: Duration::from_secs(5),
        })
    }
}

/// One batch's changes in the log.
#[derive(Serialize, Deserialize)]
struct LoggedChange {
    #[serde(rename = "type")]
    event_type: String,
    object: Object,
}

pub(crate) struct Etcd {
    /// Taken when the store is dropped, to shut down without waiting.
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    prefix: String,
    endpoints: String,
    timeout: Duration,
    /// Why the last call failed for want of etcd, until one works again.
    fault: Mutex<Option<String>>,
    /// This server's batches one at a time (other servers' are kept out by
    /// the counter's comparison).
    writer: Mutex<()>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The end of the key range of everything starting with `prefix`.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

fn log_key(prefix: &str, revision: u64) -> String {
    format!("{prefix}log/{revision:020}")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// The counter's value and etcd's revision of it (0 when it was never
/// written), and the etcd revision the read saw.
fn counter_of(response: &GetResponse) -> Result<(u64, i64, i64), StoreError> {
    let at = response.header().map_or(0, |h| h.revision());
    let (counter, version) = counter_in(response.kvs().first())?;
    Ok((counter, version, at))
}

/// The counter's value and etcd's revision of it, from its key's entry.
fn counter_in(kv: Option<&etcd_client::KeyValue>) -> Result<(u64, i64), StoreError> {
    let Some(kv) = kv else {
        return Ok((0, 0));
    };
    let text = std::str::from_utf8(kv.value()).unwrap_or_default();
    let counter = text.parse().map_err(|_| StoreError::Backend {
        context: "reading the revision counter from etcd".into(),
        source: format!("{text:?} is not a revision").into(),
    })?;
    Ok((counter, kv.mod_revision()))
}

/// Makes watch events of a logged batch.
fn events_of(bytes: &[u8]) -> Result<Vec<WatchEvent>, StoreError> {
    let changes: Vec<LoggedChange> = decode(bytes)?;
    changes
        .into_iter()
        .map(|change| {
            let event_type = match change.event_type.as_str() {
                "ADDED" => EventType::Added,
                "MODIFIED" => EventType::Modified,
                _ => EventType::Deleted,
            };
            let revision = change
                .object
                .metadata
                .resource_version
                .as_deref()
                .map(crate::parse_rv)
                .transpose()?
                .unwrap_or(0);
            let key = crate::batch::key_of(&change.object)?;
            let size = serde_json::to_vec(&change.object).map_or(0, |b| b.len());
            Ok(WatchEvent::new(
                event_type,
                change.object,
                revision,
                key,
                size,
            ))
        })
        .collect()
}

impl Etcd {
    /// Connects and reads the store's revision.
    pub(crate) fn connect(config: &EtcdConfig) -> Result<(Etcd, u64), StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmesh-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend {
                context: "starting the etcd client's runtime".into(),
                source: Box::new(e),
            })?;
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let urls: Vec<String> = config
            .endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            // A member cut off from the others answers nothing rather
            // than stale data, and its watches end.
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let endpoints = config.endpoints.join(",");
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = sender.send(Client::connect(urls, Some(options)).await);
        });
        let client = receiver
            .recv_timeout(config.timeout + Duration::from_secs(1))
            .map_err(|_| unavailable(&endpoints, "connecting"))?
            .map_err(|e| failed(&endpoints, "connecting", e))?;
        let etcd = Etcd {
            runtime: Some(runtime),
            client,
            prefix: config.prefix.clone(),
            endpoints,
            timeout: config.timeout,
            fault: Mutex::new(None),
            writer: Mutex::new(()),
        };
        let (counter, _, _) = etcd.read_counter()?;
        Ok((etcd, counter))
    }

    /// Feeds `history` with every server's changes from now on, until the
    /// store is dropped.
    pub(crate) fn follow(&self, history: Arc<History>) {
        let client = self.client.clone();
        let prefix = self.prefix.clone();
        if let Some(runtime) = &self.runtime {
            runtime.spawn(async move {
                loop {
                    if let Err(e) = follow_log(client.clone(), &prefix, &history).await {
                        tracing::warn!("following the store's changes in etcd: {e}; again shortly");
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            });
        }
    }

    /// Runs `call` on the backend's runtime and waits for it, up to the
    /// time limit. A call that could not reach a member is tried again
    /// (the client spreads calls over the members, and one may be down);
    /// one that may have reached etcd is tried again only if `resend` says
    /// that repeating it is harmless.
    fn run<T, F>(
        &self,
        what: &str,
        resend: Resend,
        call: impl Fn(Client) -> F + Send + 'static,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| unavailable(&self.endpoints, what))?;
        let client = self.client.clone();
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        let deadline = tokio::time::Instant::now() + self.timeout;
        runtime.spawn(async move {
            let outcome = loop {
                match tokio::time::timeout_at(deadline, call(client.clone())).await {
                    Ok(Err(e))
                        if resend.allows(&e)
                            && tokio::time::Instant::now() + RETRY_PAUSE < deadline =>
                    {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    other => break other,
                }
            };
            let _ = sender.send(outcome);
        });
        let result = match receiver.recv() {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(e))) => Err(failed(&self.endpoints, what, e)),
            Ok(Err(_)) | Err(_) => Err(unavailable(&self.endpoints, what)),
        };
        match &result {
            Err(StoreError::Unavailable(why)) => {
                let mut fault = self.fault.lock();
                if fault.is_none() {
                    tracing::error!("{why}");
                }
                *fault = Some(why.clone());
            }
            Ok(_) => {
                if self.fault.lock().take().is_some() {
                    tracing::info!(endpoints = %self.endpoints, "etcd answers again");
                }
            }
            Err(_) => {}
        }
        result
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// The counter, its etcd revision, and the etcd revision read at.
    fn read_counter(&self) -> Result<(u64, i64, i64), StoreError> {
        let key = self.key("revision");
        let response = self.run("reading the store's revision", Resend::Yes, move |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        counter_of(&response)
    }

    pub(crate) fn fault(&self) -> Option<String> {
        self.fault.lock().clone()
    }

    /// The counter (as [`Etcd::read_counter`]) and the objects under
    /// storage `keys`, all at one etcd revision, in as few round trips as
    /// etcd's limit on a transaction's operations allows: what a batch
    /// reads, fetched before it runs.
    #[allow(clippy::type_complexity)]
    fn read_with_counter(
        &self,
        keys: &[String],
    ) -> Result<(u64, i64, i64, BTreeMap<String, Option<Vec<u8>>>), StoreError> {
        let mut chunks = keys.chunks(PREFETCH_CHUNK);
        let first: Vec<String> = chunks.next().map(<[String]>::to_vec).unwrap_or_default();
        let counter_key = self.key("revision");
        let objects = self.key("objects/");
        let response = {
            let mut ops = vec![TxnOp::get(counter_key.clone(), None)];
            ops.extend(
                first
                    .iter()
                    .map(|k| TxnOp::get(format!("{objects}{k}"), None)),
            );
            let request = Txn::new().and_then(ops);
            self.run("reading what a batch touches", Resend::Yes, move |mut c| {
                let request = request.clone();
                async move { c.txn(request).await }
            })?
        };
        let at = response.header().map_or(0, |h| h.revision());
        let mut answers = response.op_responses().into_iter();
        let (counter, counter_version) = match answers.next() {
            Some(etcd_client::TxnOpResponse::Get(get)) => counter_in(get.kvs().first())?,
            _ => (0, 0),
        };
        let mut read = BTreeMap::new();
        for (key, answer) in first.iter().zip(answers) {
            if let etcd_client::TxnOpResponse::Get(get) = answer {
                read.insert(key.clone(), get.kvs().first().map(|kv| kv.value().to_vec()));
            }
        }
        for chunk in chunks {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| {
                    TxnOp::get(
                        format!("{objects}{k}"),
                        Some(GetOptions::new().with_revision(at)),
                    )
                })
                .collect();
            let request = Txn::new().and_then(ops);
            let response =
                self.run("reading what a batch touches", Resend::Yes, move |mut c| {
                    let request = request.clone();
                    async move { c.txn(request).await }
                })?;
            for (key, answer) in chunk.iter().zip(response.op_responses()) {
                if let etcd_client::TxnOpResponse::Get(get) = answer {
                    read.insert(key.clone(), get.kvs().first().map(|kv| kv.value().to_vec()));
                }
            }
        }
        Ok((counter, counter_version, at, read))
    }

    /// A read that needs etcd's quorum.
    pub(crate) fn check_writable(&self) -> Result<(), StoreError> {
        self.read_counter().map(drop)
    }

    pub(crate) fn get(&self, key: &ObjectKey) -> Result<Option<Object>, StoreError> {
        let key = self.key(&format!("objects/{}", key.storage_key()));
        let response = self.run("reading an object", Resend::Yes, move |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        response
            .kvs()
            .first()
            .map(|kv| decode(kv.value()))
            .transpose()
    }

    /// One page of keys and values from `start` (inclusive) to `end`, at
    /// etcd revision `at` (0: the latest).
    fn page(
        &self,
        what: &str,
        start: Vec<u8>,
        end: Vec<u8>,
        at: i64,
        limit: i64,
    ) -> Result<GetResponse, StoreError> {
        self.run(what, Resend::Yes, move |mut c| {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(limit);
            if at > 0 {
                options = options.with_revision(at);
            }
            let start = start.clone();
            async move { c.get(start, Some(options)).await }
        })
    }

    /// Visits keys and values under `prefix` from `start`, page by page,
    /// at etcd revision `at`, until `visit` returns false.
    fn visit_range(
        &self,
        what: &str,
        prefix: &str,
        start: Vec<u8>,
        at: i64,
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        const PAGE: i64 = 500;
        let end = range_end(prefix);
        let mut start = start;
        loop {
            let response = self.page(what, start.clone(), end.clone(), at, PAGE)?;
            for kv in response.kvs() {
                if !visit(kv.key(), kv.value())? {
                    return Ok(());
                }
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(()),
            }
        }
    }

    pub(crate) fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        mut visit: impl FnMut(&str, Object) -> bool,
    ) -> Result<u64, StoreError> {
        let (counter, _, at) = self.read_counter()?;
        let objects = self.key("objects/");
        let range = format!("{objects}{prefix}");
        let start = match after {
            Some(after) => {
                let mut start = format!("{objects}{after}").into_bytes();
                start.push(0);
                start
            }
            None => range.clone().into_bytes(),
        };
        self.visit_range("listing objects", &range, start, at, |key, value| {
            let key = std::str::from_utf8(&key[objects.len()..]).unwrap_or_default();
            Ok(visit(key, decode(value)?))
        })?;
        Ok(counter)
    }

    pub(crate) fn write_batch(
        &self,
        ops: Vec<crate::Op>,
        dry_run: bool,
        history: &Arc<History>,
    ) -> Result<Vec<Outcome>, BatchError> {
        let fail = |error| BatchError { index: 0, error };
        let _writer = self.writer.lock();
        // Other servers' batches win the counter now and then; each loss
        // costs a round trip, so this many in a row means something is wrong.
        for _ in 0..64 {
            let (counter, counter_version, at, read) = self
                .read_with_counter(&batch::keys_read(&ops))
                .map_err(fail)?;
            let txn = Overlay {
                etcd: self,
                at,
                read: RefCell::new(read),
                written: RefCell::default(),
            };
            let applied = batch::apply(&txn, ops.clone(), counter, dry_run)?;
            if dry_run || applied.events.is_empty() {
                return Ok(applied.outcomes);
            }
            let mut changes = Vec::with_capacity(applied.events.len());
            for event in &applied.events {
                changes.push(LoggedChange {
                    event_type: event.event_type.as_str().into(),
                    object: (*event.object).clone(),
                });
            }
            let log = serde_json::to_vec(&changes)
                .map_err(StoreError::from)
                .map_err(fail)?;
            let mut puts: Vec<TxnOp> = txn
                .written
                .into_inner()
                .into_iter()
                .map(|(key, value)| {
                    let key = self.key(&format!("objects/{key}"));
                    match value {
                        Some(bytes) => TxnOp::put(key, bytes, None),
                        None => TxnOp::delete(key, None),
                    }
                })
                .collect();
            puts.push(TxnOp::put(
                log_key(&self.prefix, applied.revision),
                log,
                None,
            ));
            puts.push(TxnOp::put(
                self.key("revision"),
                applied.revision.to_string(),
                None,
            ));
            let keep_from = applied.revision.saturating_sub(HISTORY as u64);
            if keep_from > 0 {
                puts.push(TxnOp::delete(
                    self.key("log/"),
                    Some(DeleteOptions::new().with_range(log_key(&self.prefix, keep_from))),
                ));
            }
            let unmoved = if counter_version == 0 {
                Compare::version(self.key("revision"), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(self.key("revision"), CompareOp::Equal, counter_version)
            };
            let request = Txn::new().when(vec![unmoved]).and_then(puts);
            let committed = self
                .run("committing a batch", Resend::IfUnsent, move |mut c| {
                    let request = request.clone();
                    async move { c.txn(request).await }
                })
                .map_err(fail)?;
            if !committed.succeeded() {
                continue;
            }
            // Read-your-writes: the caller's next watch or list on this
            // server sees the batch.
            let reached = self
                .run("waiting for the batch to come back", Resend::No, {
                    let revision = applied.revision;
                    let history = history.clone();
                    let limit = self.timeout;
                    move |_| {
                        let history = history.clone();
                        async move {
                            Ok::<_, etcd_client::Error>(history.reached(revision, limit).await)
                        }
                    }
                })
                .unwrap_or(false);
            if !reached {
                tracing::warn!(
                    revision = applied.revision,
                    "a committed batch has not come back from etcd yet"
                );
            }
            return Ok(applied.outcomes);
        }
        Err(fail(StoreError::Unavailable(format!(
            "etcd at {}: the batch lost the race for the store's revision 64 times in a row",
            self.endpoints
        ))))
    }

    pub(crate) fn record(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key(&format!("records/{name}"));
        let response = self.run("reading a record", Resend::Yes, move |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    pub(crate) fn records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let records = self.key("records/");
        let range = format!("{records}{prefix}");
        let mut found = Vec::new();
        self.visit_range(
            "listing records",
            &range,
            range.clone().into_bytes(),
            0,
            |key, value| {
                let name = String::from_utf8_lossy(&key[records.len()..]).into_owned();
                found.push((name, value.to_vec()));
                Ok(true)
            },
        )?;
        Ok(found)
    }

    pub(crate) fn snapshot(&self, out: &mut dyn std::io::Write) -> Result<u64, StoreError> {
        let (counter, _, at) = self.read_counter()?;
        let mut objects = Vec::new();
        let objects_prefix = self.key("objects/");
        self.visit_range(
            "reading every object",
            &objects_prefix,
            objects_prefix.clone().into_bytes(),
            at,
            |_, value| {
                objects.push(decode(value)?);
                Ok(true)
            },
        )?;
        let mut records = Vec::new();
        let records_prefix = self.key("records/");
        self.visit_range(
            "reading every record",
            &records_prefix,
            records_prefix.clone().into_bytes(),
            at,
            |key, value| {
                let name = String::from_utf8_lossy(&key[records_prefix.len()..]).into_owned();
                records.push((name, value.to_vec()));
                Ok(true)
            },
        )?;
        crate::snapshot::write(out, counter, objects, records)?;
        Ok(counter)
    }

    /// Writes a snapshot's contents under the prefix `config` names, which
    /// must hold nothing: objects and records in transactions of at most
    /// [`IMPORT_CHUNK`] writes (etcd's default limit is 128), the revision
    /// counter last.
    pub(crate) fn import(
        config: &EtcdConfig,
        contents: &crate::snapshot::Contents,
    ) -> Result<(), StoreError> {
        let (etcd, _) = Etcd::connect(config)?;
        let everything = etcd.key("");
        let held = etcd.page(
            "looking for what the prefix holds",
            everything.clone().into_bytes(),
            range_end(&everything),
            0,
            1,
        )?;
        if !held.kvs().is_empty() {
            return Err(StoreError::Unsupported(
                "etcd holds a store under this prefix already: restore into an empty prefix",
            ));
        }
        let mut writes: Vec<(String, Vec<u8>)> = Vec::new();
        for object in &contents.objects {
            let key = crate::batch::key_of(object)?.storage_key();
            writes.push((
                etcd.key(&format!("objects/{key}")),
                serde_json::to_vec(object)?,
            ));
        }
        for (name, value) in &contents.records {
            writes.push((etcd.key(&format!("records/{name}")), value.clone()));
        }
        writes.push((
            etcd.key("revision"),
            contents.revision.to_string().into_bytes(),
        ));
        for chunk in writes.chunks(IMPORT_CHUNK) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(key, value)| TxnOp::put(key.clone(), value.clone(), None))
                .collect();
            let request = Txn::new().and_then(ops);
            etcd.run("restoring a snapshot", Resend::Yes, move |mut c| {
                let request = request.clone();
                async move { c.txn(request).await }
            })?;
        }
        Ok(())
    }

    pub(crate) fn swap_record(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let key = self.key(&format!("records/{name}"));
        let unchanged = match expected {
            Some(bytes) => Compare::value(key.clone(), CompareOp::Equal, bytes.to_vec()),
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
        };
        let write = match new {
            Some(bytes) => TxnOp::put(key, bytes, None),
            None => TxnOp::delete(key, None),
        };
        let request = Txn::new().when(vec![unchanged]).and_then(vec![write]);
        let response = self.run("swapping a record", Resend::IfUnsent, move |mut c| {
            let request = request.clone();
            async move { c.txn(request).await }
        })?;
        Ok(response.succeeded())
    }

    pub(crate) fn write_records(
        &self,
        writes: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<(), StoreError> {
        let ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|(name, value)| {
                let key = self.key(&format!("records/{name}"));
                match value {
                    Some(bytes) => TxnOp::put(key, bytes, None),
                    None => TxnOp::delete(key, None),
                }
            })
            .collect();
        let request = Txn::new().and_then(ops);
        self.run("writing records", Resend::Yes, move |mut c| {
            let request = request.clone();
            async move { c.txn(request).await }
        })?;
        Ok(())
    }
}

fn tls_options(tls: &EtcdTls) -> Result<etcd_client::TlsOptions, StoreError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| StoreError::Backend {
            context: format!("reading {}", path.display()),
            source: Box::new(e),
        })
    };
    let mut options = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
    if let Some((cert, key)) = &tls.client {
        options = options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}

/// Reads per transaction when a batch fetches what it touches (etcd takes
/// 128 operations in one by default).
const PREFETCH_CHUNK: usize = 100;

/// Writes per transaction when a snapshot is restored.
const IMPORT_CHUNK: usize = 100;

/// The pause before a call is tried again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Whether a failed call may be sent again.
#[derive(Clone, Copy)]
enum Resend {
    /// Repeating it changes nothing (reads, plain puts).
    Yes,
    /// Only if it never reached a member: a commit that may have been
    /// applied must not be applied twice.
    IfUnsent,
    No,
}

impl Resend {
    fn allows(self, error: &etcd_client::Error) -> bool {
        let unavailable = matches!(error, etcd_client::Error::GRpcStatus(status)
            if status.code() == tonic::Code::Unavailable);
        let unsent = unavailable && error.to_string().contains("connect");
        match self {
            Resend::Yes => unavailable,
            Resend::IfUnsent => unsent,
            Resend::No => false,
        }
    }
}

fn unavailable(endpoints: &str, what: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "etcd at {endpoints} did not answer ({what}): is it running, and has it a quorum of members?"
    ))
}

/// etcd's refusals: those that mean "not now" make the store unavailable;
/// the rest are errors of the request.
fn failed(endpoints: &str, what: &str, error: etcd_client::Error) -> StoreError {
    use etcd_client::Error;
    match &error {
        Error::TransportError(_) | Error::IoError(_) => StoreError::Unavailable(format!(
            "etcd at {endpoints} ({what}): {error}"
        )),
        // tonic reports a connection that broke mid-request (a member
        // killed under it) as a status of code Unknown over the transport error.
        Error::GRpcStatus(status)
            if matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) || std::error::Error::source(status)
                .is_some_and(|source| source.is::<tonic::transport::Error>()) =>
        {
            StoreError::Unavailable(format!(
                "etcd at {endpoints} ({what}): {}: is it running, and has it a quorum of members?",
                status.message()
            ))
        }
        Error::GRpcStatus(status) if status.message().contains("too many operations") => {
            StoreError::Backend {
                context: format!("etcd at {endpoints} ({what})"),
                source: format!(
                    "{}: the batch has more objects than this etcd takes in one transaction (raise its --max-txn-ops, or apply fewer at once)",
                    status.message()
                )
                .into(),
            }
        }
        Error::GRpcStatus(status) if status.message().contains("too large") => {
            StoreError::Backend {
                context: format!("etcd at {endpoints} ({what})"),
                source: format!(
                    "{}: the batch is larger than this etcd takes in one request (raise its --max-request-bytes, or apply less at once)",
                    status.message()
                )
                .into(),
            }
        }
        _ => StoreError::Backend {
            context: format!("etcd at {endpoints} ({what})"),
            source: Box::new(error),
        },
    }
}

/// A batch's view of etcd: reads at one etcd revision, its own writes on
/// top, committed by [`Etcd::write_batch`] only if nothing moved meanwhile.
struct Overlay<'a> {
    etcd: &'a Etcd,
    at: i64,
    /// What this batch has read from etcd (`None`: absent).
    read: RefCell<BTreeMap<String, Option<Vec<u8>>>>,
    /// What it has written (`None`: deleted), by storage key.
    written: RefCell<BTreeMap<String, Option<Vec<u8>>>>,
}

impl BatchTxn for Overlay<'_> {
    fn read(&self, key: &str) -> Result<Option<Object>, StoreError> {
        if let Some(value) = self.written.borrow().get(key) {
            return value.as_deref().map(decode).transpose();
        }
        if let Some(value) = self.read.borrow().get(key) {
            return value.as_deref().map(decode).transpose();
        }
        let full = self.etcd.key(&format!("objects/{key}"));
        let at = self.at;
        let response = self
            .etcd
            .run("reading an object", Resend::Yes, move |mut c| {
                let full = full.clone();
                async move { c.get(full, Some(GetOptions::new().with_revision(at))).await }
            })?;
        let value = response.kvs().first().map(|kv| kv.value().to_vec());
        self.read
            .borrow_mut()
            .insert(key.to_string(), value.clone());
        value.as_deref().map(decode).transpose()
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.written
            .borrow_mut()
            .insert(key.to_string(), Some(bytes.to_vec()));
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.written.borrow_mut().insert(key.to_string(), None);
        Ok(())
    }

    fn objects(&self) -> Result<Vec<Object>, StoreError> {
        let objects_prefix = self.etcd.key("objects/");
        let mut all: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        self.etcd.visit_range(
            "reading every object",
            &objects_prefix,
            objects_prefix.clone().into_bytes(),
            self.at,
            |key, value| {
                let key = String::from_utf8_lossy(&key[objects_prefix.len()..]).into_owned();
                all.insert(key, value.to_vec());
                Ok(true)
            },
        )?;
        for (key, value) in self.written.borrow().iter() {
            match value {
                Some(bytes) => all.insert(key.clone(), bytes.clone()),
                None => all.remove(key),
            };
        }
        all.values().map(|bytes| decode(bytes)).collect()
    }
}

/// Reads the batches logged after what `history` holds, then watches for
/// more, adding each to it; returns when the watch ends.
async fn follow_log(mut client: Client, prefix: &str, history: &History) -> Result<(), StoreError> {
    let log_prefix = format!("{prefix}log/");
    let end = range_end(&log_prefix);
    let backend = |e: etcd_client::Error| StoreError::Backend {
        context: "following the log".into(),
        source: Box::new(e),
    };
    // What was logged since: from the first batch that ends after what
    // the history holds.
    let mut start = log_key(prefix, history.revision() + 1).into_bytes();
    let mut at = 0;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(100);
        if at > 0 {
            options = options.with_revision(at);
        }
        let response = client
            .get(start.clone(), Some(options))
            .await
            .map_err(backend)?;
        if at == 0 {
            at = response.header().map_or(0, |h| h.revision());
        }
        for kv in response.kvs() {
            add_batch(history, kv.value())?;
        }
        match response.kvs().last() {
            Some(last) if response.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => break,
        }
    }
    let mut stream = client
        .watch(
            log_prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(at + 1),
            ),
        )
        .await
        .map_err(backend)?;
    while let Some(response) = stream.message().await.map_err(backend)? {
        if response.canceled() {
            return Err(StoreError::Unavailable(format!(
                "the watch ended: {}",
                response.cancel_reason()
            )));
        }
        for event in response.events() {
            if event.event_type() == etcd_client::EventType::Put
                && let Some(kv) = event.kv()
            {
                add_batch(history, kv.value())?;
            }
        }
    }
    Ok(())
}

fn add_batch(history: &History, logged: &[u8]) -> Result<(), StoreError> {
    let events = events_of(logged)?;
    if let Some(last) = events.last() {
        history.extend(last.revision, events);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
