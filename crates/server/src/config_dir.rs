//! Keeps a directory of manifests applied: files created, changed or deleted
//! become objects created, updated or deleted, without a restart.
//!
//! Objects from the directory carry the annotation [`SOURCE_ANNOTATION`] naming
//! their file, so the follower knows which objects are its own. A file that
//! does not decode keeps its previous objects (a half-saved edit must not
//! delete a service); its problems are logged with file, line and field.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use vmesh_api::decode::decode_sources;
use vmesh_api::{Object, ObjectKey, kinds};
use vmesh_store::{Op, Selection, Store};

use crate::ServerError;

/// Annotation naming the config-dir file an object came from.
pub const SOURCE_ANNOTATION: &str = "vmesh.io/config-file";

/// How long file events must be quiet before the directory is read again.
const QUIET: Duration = Duration::from_millis(200);

pub struct Follower {
    store: Arc<Store>,
    dir: PathBuf,
}

impl Follower {
    pub fn new(store: Arc<Store>, dir: PathBuf) -> Result<Follower, ServerError> {
        if !dir.is_dir() {
            return Err(ServerError::ConfigDir {
                path: dir,
                message: "not a directory".into(),
            });
        }
        Ok(Follower { store, dir })
    }

    /// Syncs now, then after every burst of file events, until shutdown.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let debouncer = notify_debouncer_full::new_debouncer(
            QUIET,
            None,
            move |events: notify_debouncer_full::DebounceEventResult| {
                // Reading the files is an event too (an open, a close):
                // syncing on those would read them again, forever.
                let changed = events.map_or(true, |events| {
                    events
                        .iter()
                        .any(|event| !matches!(event.kind, notify::EventKind::Access(_)))
                });
                if changed {
                    let _ = tx.send(());
                }
            },
        );
        let _debouncer = match debouncer {
            Ok(mut d) => match d.watch(&self.dir, notify::RecursiveMode::Recursive) {
                Ok(()) => Some(d),
                Err(e) => {
                    tracing::error!(dir = %self.dir.display(), "cannot follow config dir: {e}");
                    None
                }
            },
            Err(e) => {
                tracing::error!("cannot follow config dir: {e}");
                None
            }
        };
        self.sync();
        loop {
            tokio::select! {
                events = rx.recv() => match events {
                    Some(_) => self.sync(),
                    None => return,
                },
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Makes the store match the directory.
    pub fn sync(&self) {
        let files = manifest_files(&self.dir);
        let texts: Vec<(String, String)> = files
            .iter()
            .filter_map(|path| {
                let name = path
                    .strip_prefix(&self.dir)
                    .unwrap_or(path)
                    .display()
                    .to_string();
                match std::fs::read_to_string(path) {
                    Ok(text) => Some((name, text)),
                    Err(e) => {
                        tracing::warn!(file = %path.display(), "cannot read: {e}");
                        None
                    }
                }
            })
            .collect();
        let mut broken: BTreeSet<String> = BTreeSet::new();
        let mut desired: BTreeMap<String, Vec<Object>> = BTreeMap::new();
        for (name, text) in &texts {
            let decoded = decode_sources([(name.as_str(), text.as_str())], "default");
            for problem in &decoded.problems {
                tracing::warn!("config dir: {}", problem);
            }
            if decoded.has_errors() {
                broken.insert(name.clone());
                continue;
            }
            let objects = decoded.objects.into_iter().map(|located| {
                let mut object = located.object;
                object
                    .metadata
                    .annotations
                    .get_or_insert_default()
                    .insert(SOURCE_ANNOTATION.into(), name.clone());
                object
            });
            desired.insert(name.clone(), objects.collect());
        }
        // A file whose objects the store refuses (say, their namespace is
        // missing) is set aside so the rest still apply.
        loop {
            let ops = self.plan(&desired, &broken);
            if ops.is_empty() {
                return;
            }
            let files_of_ops: Vec<String> = ops.iter().map(|(file, _)| file.clone()).collect();
            match self
                .store
                .commit(ops.into_iter().map(|(_, op)| op).collect())
            {
                Ok(outcomes) => {
                    for outcome in outcomes.iter().filter(|o| o.verb() != "unchanged") {
                        tracing::info!(
                            "config dir: {} {}",
                            outcome.object().display_name(),
                            outcome.verb()
                        );
                    }
                    return;
                }
                Err(e) => {
                    let file = files_of_ops[e.index].clone();
                    tracing::warn!("config dir: {file}: {}", e.error);
                    desired.remove(&file);
                    broken.insert(file);
                }
            }
        }
    }

    /// Ops that make the store match `desired`, each with the file it is for.
    fn plan(
        &self,
        desired: &BTreeMap<String, Vec<Object>>,
        broken: &BTreeSet<String>,
    ) -> Vec<(String, Op)> {
        let mut ops: Vec<(String, Op)> = Vec::new();
        let mut wanted: HashSet<ObjectKey> = HashSet::new();
        for (file, objects) in desired {
            for object in objects {
                if let Some(key) = object.key() {
                    wanted.insert(key);
                }
                ops.push((file.clone(), Op::Apply(object.clone())));
            }
        }
        for info in kinds() {
            let selection = Selection::of_kind(info, None);
            let Ok((existing, _)) = self.store.list(&selection) else {
                continue;
            };
            for object in existing {
                let Some(file) = object
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(SOURCE_ANNOTATION))
                else {
                    continue;
                };
                let Some(key) = object.key() else { continue };
                if !wanted.contains(&key) && !broken.contains(file) {
                    ops.push((
                        file.clone(),
                        Op::Delete {
                            key,
                            expected: None,
                        },
                    ));
                }
            }
        }
        // Unchanged objects are cheap no-ops in the store, but skip the batch
        // entirely when nothing differs.
        let changed = ops.iter().any(|(_, op)| match op {
            Op::Apply(object) => object
                .key()
                .and_then(|k| self.store.get(&k).ok().flatten())
                .is_none_or(|current| !current.same_content(object)),
            _ => true,
        });
        if changed { ops } else { Vec::new() }
    }
}

/// `*.yaml`, `*.yml` and `*.json` files under `dir`, sorted, hidden files skipped.
fn manifest_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}
