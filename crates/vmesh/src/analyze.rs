//! `vmesh analyze` (istioctl analyze): gathers the objects to analyze —
//! manifest files read as `vmesh validate` reads them, the server's objects
//! through the config API, or both — runs the registry's analyzers
//! (`vmesh_registry::analysis`) and prints their messages as istioctl does,
//! with where each object was read from.
//!
//! The analysis itself and the messages' codes and wording belong to the
//! registry; this module reads, chooses the namespace reported on, and prints.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::{Result, bail};
use serde_json::Value;
use vmesh_api::decode::{Located, decode_sources, field_line};
use vmesh_api::{Object, decode_manifests};
use vmesh_registry::analysis::{self, Level, Message, Resource};

use crate::Connection;
use crate::client::{ApiError, Client};
use crate::manifests;

pub const ABOUT: &str = "\
Analyze configuration and print validation messages, as istioctl analyze does.

Without files, the server's objects are analyzed (VMESH_SERVER, --server), and
messages about namespace `default` are printed unless -n or -A says otherwise.

With files (-f, or as arguments), the files are combined with the server's
objects when the server answers, the files' objects replacing the server's
ones of the same name (what applying them would make); when the server does
not answer, or with --use-kube=false, the files are analyzed alone. Messages
about every namespace are printed unless -n or -A says otherwise. Documents
that are not Kubernetes objects (cloud-init, notes) are skipped.

Codes IST0101 (a host, subset, namespace or selector that names nothing),
IST0106/IST0133 (`vmesh validate`'s errors and warnings, among them what vmesh
accepts but does not apply), IST0118/IST0150 (port names), IST0173 (a subset
that selects no workload), IST0174 (a DestinationRule host that names no
service) are Istio's; VM0001 (DestinationRules for one host whose merge drops a
traffic policy or subset), VM0002 (a WorkloadGroup meant to serve that no
Service selects) and VM0003 (TLS disabled towards a STRICT WorkloadEntry) are
vmesh's own.

Exit status: 1 when a message is at least --failure-threshold (Error), else 0.";

#[derive(Debug, clap::Args)]
pub struct AnalyzeArgs {
    /// Files or directories to analyze (`-` for standard input).
    #[arg(short = 'f', long = "filename", num_args = 1..)]
    files: Vec<String>,
    /// More files or directories, as istioctl takes them.
    #[arg(value_name = "FILE")]
    paths: Vec<String>,
    /// Print messages about this namespace only; file objects without a namespace get it.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Print messages about every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    all_namespaces: bool,
    /// log, json or yaml.
    #[arg(short = 'o', long, default_value = "log", value_parser = ["log", "json", "yaml"])]
    output: String,
    /// Use the server's objects; --use-kube=false analyzes the files alone.
    #[arg(
        short = 'k',
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    use_kube: bool,
    /// The level from which a message makes the exit status 1: Error, Warning or Info.
    #[arg(long, default_value = "Error", value_parser = parse_level)]
    failure_threshold: Level,
    /// The level from which messages are printed.
    #[arg(long, default_value = "Info", value_parser = parse_level)]
    output_threshold: Level,
    #[command(flatten)]
    connection: Connection,
}

fn parse_level(name: &str) -> Result<Level, String> {
    Level::parse(name).ok_or_else(|| format!("{name:?} is not one of Error, Warning, Info"))
}

/// A message and where its object was read from, when from a file.
struct Report {
    message: Message,
    reference: Option<String>,
}

/// The objects to analyze, each with the file it was read from (if any).
#[derive(Default)]
struct Gathered {
    /// By kind, namespace and name: a file's object replaces the server's.
    objects: HashMap<Resource, (Object, Option<Located>)>,
    reports: Vec<Report>,
    /// `(name, text)` of the files read.
    sources: Vec<(String, String)>,
}

fn identity(object: &Object) -> Resource {
    Resource {
        kind: object.kind.clone(),
        namespace: object.metadata.namespace.clone(),
        name: object.metadata.name().to_string(),
    }
}

impl Gathered {
    fn add_files(&mut self, files: &[String], namespace: &str) -> Result<()> {
        self.sources = manifests::read_sources(files)?;
        let decoded = decode_sources(
            self.sources.iter().map(|(n, t)| (n.as_str(), t.as_str())),
            namespace,
        );
        for problem in decoded.problems {
            if problem.is_not_an_object() {
                // istioctl skips documents of no known kind.
                eprintln!(
                    "Skipping {}:{}: not a Kubernetes object",
                    problem.file, problem.line
                );
                continue;
            }
            if problem.is_redefinition() {
                continue;
            }
            self.reports.push(Report {
                message: Message::schema(
                    problem.is_error(),
                    &problem.object,
                    &problem.field,
                    &problem.message,
                ),
                reference: Some(format!("{}:{}", problem.file, problem.line)),
            });
        }
        for located in decoded.objects {
            self.objects.insert(
                identity(&located.object),
                (located.object.clone(), Some(located)),
            );
        }
        Ok(())
    }

    fn add_live(&mut self, objects: Vec<Object>) {
        for object in objects {
            self.objects.insert(identity(&object), (object, None));
        }
    }

    /// Where a message's object was read from: `file:line`, the line of the
    /// field it points at when that can be found.
    fn reference(&self, message: &Message) -> Option<String> {
        let located = self.objects.get(message.resource.as_ref()?)?.1.as_ref()?;
        let line = self
            .sources
            .iter()
            .find(|(name, _)| *name == located.file)
            .filter(|_| !message.field.is_empty())
            .and_then(|(_, text)| field_line(text, located.document, &message.field))
            .unwrap_or(located.line);
        Some(format!("{}:{line}", located.file))
    }

    /// Every message: validation's, then the analyzers'.
    fn analyze(mut self) -> Vec<Report> {
        let objects: Vec<Object> = self.objects.values().map(|(o, _)| o.clone()).collect();
        let live = self.objects.values().filter(|(_, from)| from.is_none());
        let checked: Vec<Message> = live.flat_map(|(o, _)| validation_messages(o)).collect();
        let analyzed = analysis::analyze(&objects);
        let mut reports = std::mem::take(&mut self.reports);
        reports.extend(checked.into_iter().map(|message| Report {
            message,
            reference: None,
        }));
        for message in analyzed {
            let reference = self.reference(&message);
            reports.push(Report { message, reference });
        }
        reports
    }
}

/// What `vmesh validate` says of an object read from the server: warnings,
/// as the server refuses invalid objects.
fn validation_messages(object: &Object) -> Vec<Message> {
    let text = serde_json::to_string(object).unwrap_or_default();
    decode_manifests("server", &text)
        .problems
        .iter()
        .map(|p| Message::schema(p.is_error(), &object.display_name(), &p.field, &p.message))
        .collect()
}

/// Every object the server holds, of every kind the analyzers may read.
pub async fn live_objects(client: &Client) -> Result<Vec<Object>, ApiError> {
    let mut objects = Vec::new();
    for info in vmesh_api::kinds() {
        if info.kind == vmesh_api::kinds::config_map::KIND.kind {
            continue;
        }
        let what = format!("listing {}", info.plural);
        let list = client.get(&info.path(None, None), &what).await?;
        for item in list["items"].as_array().into_iter().flatten() {
            let object =
                serde_json::from_value(item.clone()).map_err(|source| ApiError::Unexpected {
                    what: what.clone(),
                    server: client.server().to_string(),
                    source,
                })?;
            objects.push(object);
        }
    }
    Ok(objects)
}

/// The messages about the server's objects, every namespace: what `vmesh
/// doctor` reports.
pub async fn live_messages(client: &Client) -> Result<Vec<Message>, ApiError> {
    let objects = live_objects(client).await?;
    let mut messages: Vec<Message> = objects.iter().flat_map(validation_messages).collect();
    messages.extend(analysis::analyze(&objects));
    analysis::sort(&mut messages);
    Ok(messages)
}

pub async fn run(args: AnalyzeArgs) -> Result<ExitCode> {
    let files: Vec<String> = args.files.iter().chain(&args.paths).cloned().collect();
    if files.is_empty() && !args.use_kube {
        bail!("--use-kube=false analyzes files: give them with -f");
    }
    let mut gathered = Gathered::default();
    if args.use_kube {
        let client = Client::config_api(&args.connection)?;
        match live_objects(&client).await {
            Ok(objects) => gathered.add_live(objects),
            Err(e @ ApiError::Unreachable { .. }) if !files.is_empty() => {
                eprintln!(
                    "note: {e}; analyzing the files alone (--use-kube=false skips the server)"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    let file_namespace = args.namespace.as_deref().unwrap_or("default");
    if !files.is_empty() {
        gathered.add_files(&files, file_namespace)?;
    }
    let names: Vec<String> = gathered.sources.iter().map(|(n, _)| n.clone()).collect();

    // istioctl's default is the current namespace; with files, what they hold.
    let scope = match (&args.namespace, args.all_namespaces, files.is_empty()) {
        (_, true, _) => None,
        (Some(namespace), _, _) => Some(namespace.as_str()),
        (None, false, true) => Some("default"),
        (None, false, false) => None,
    };
    let mut reports: Vec<Report> = gathered
        .analyze()
        .into_iter()
        .filter(|r| match (scope, &r.message.resource) {
            (Some(scope), Some(resource)) => {
                resource.scope() == scope || resource.scope().is_empty()
            }
            _ => true,
        })
        .collect();
    sort(&mut reports);

    let failed = reports
        .iter()
        .any(|r| r.message.level().at_least(args.failure_threshold));
    let shown: Vec<&Report> = reports
        .iter()
        .filter(|r| r.message.level().at_least(args.output_threshold))
        .collect();
    match args.output.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&as_values(&shown))?),
        "yaml" => print!("{}", serde_saphyr::to_string(&as_values(&shown))?),
        _ => {
            for report in &shown {
                println!("{}", report.message.line(report.reference.as_deref()));
            }
        }
    }
    if shown.is_empty() {
        let target = match (names.as_slice(), scope) {
            ([one], _) => format!(" {one}."),
            ([], Some(namespace)) => format!(" namespace: {namespace}."),
            ([], None) => " all namespaces.".to_string(),
            (many, _) => format!(":\n  - {}", many.join("\n  - ")),
        };
        eprintln!("\u{2714} No validation issues found when analyzing{target}");
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// istioctl's order, the same line once.
fn sort(reports: &mut Vec<Report>) {
    reports.sort_by_cached_key(|r| analysis::order(&r.message));
    reports.dedup_by(|a, b| a.message.line(None) == b.message.line(None));
}

/// istioctl's JSON form of messages.
fn as_values(reports: &[&Report]) -> Vec<Value> {
    reports
        .iter()
        .map(|r| {
            let message = &r.message;
            let origin = message.resource.as_ref().map(|r| r.friendly_name());
            let fields = [
                ("code", Some(message.code.code.to_string())),
                ("level", Some(message.level().as_str().to_string())),
                ("origin", origin),
                ("reference", r.reference.clone()),
                ("message", Some(message.text.clone())),
                ("documentationUrl", message.code.documentation_url()),
            ];
            fields
                .into_iter()
                .filter_map(|(key, value)| Some((key.to_string(), Value::String(value?))))
                .collect::<serde_json::Map<_, _>>()
                .into()
        })
        .collect()
}
