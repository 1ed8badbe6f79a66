//! What each subcommand does.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use vmesh_api::decode::{Decoded, decode_sources};
use vmesh_api::{KindInfo, kind_for};
use vmesh_server::ServerConfig;

use crate::client::Client;
use crate::{CaArgs, Command, CreateCommand, TokenCommand, manifests, output};

pub async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Server {
            data_dir,
            store,
            api_addr,
            api_token_file,
            api_tls,
            config_dir,
            xds_addr,
            xds_plaintext_addr,
            ca,
            monitoring_addr,
            auto_registration_grace,
            connections,
            backup_interval,
        } => {
            let api_token = match api_token_file {
                Some(path) => {
                    let token = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let token = token.trim().to_string();
                    if token.is_empty() {
                        bail!("{}: the token file is empty", path.display());
                    }
                    Some(token)
                }
                None => None,
            };
            let running = vmesh_server::start(ServerConfig {
                api_addr,
                api_token,
                api_tls,
                config_dir,
                xds_addr: Some(xds_addr),
                xds_plaintext_addr,
                identity: identity_config(*ca),
                auto_registration_grace,
                monitoring_addr: Some(monitoring_addr),
                connections: vmesh_server::connections::ConnectionLimits {
                    total: connections.max_connections,
                    per_source: connections.max_connections_per_source,
                    idle: connections.idle_timeout,
                },
                backup_interval,
                store: store.location(&data_dir)?,
                ..ServerConfig::new(data_dir)
            })
            .await?;
            announce(&running);
            stop_signal().await;
            running.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { files } => {
            let decoded = decode(&files, "default")?;
            Ok(if decoded.has_errors() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Ca {
            what:
                crate::CaCommand::Intermediate {
                    root_dir,
                    out,
                    name,
                    trust_domain,
                    ttl,
                },
        } => {
            vmesh_ca::write_intermediate(&root_dir, &out, &trust_domain, &name, ttl)?;
            println!(
                "intermediate CA {name:?} written to {}: start its server with --ca-cert {0}/ca-cert.pem --ca-key {0}/ca-key.pem --ca-chain {0}/cert-chain.pem",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Store {
            what: crate::StoreCommand::Check { data_dir, file },
        } => {
            let path = file.unwrap_or_else(|| data_dir.join(vmesh_store::STORE_FILE));
            match vmesh_store::backup::check(&path) {
                Ok(checked) => {
                    println!(
                        "{}: intact, {} objects, revision {}",
                        checked.path.display(),
                        checked.objects,
                        checked.revision
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Store {
            what: crate::StoreCommand::Restore { data_dir, from },
        } => {
            let restored = vmesh_store::backup::restore(&data_dir, from.as_deref())?;
            if let Some(kept) = &restored.kept {
                println!("kept the replaced store as {}", kept.display());
            }
            println!(
                "restored {} ({} objects, revision {}) as {}",
                restored.from.path.display(),
                restored.from.objects,
                restored.from.revision,
                data_dir.join(vmesh_store::STORE_FILE).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what: crate::BenchCommand::Xds(args),
        } => {
            crate::bench::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply {
            files,
            namespace,
            connection,
        } => {
            let decoded = decode(&files, &namespace)?;
            if decoded.has_errors() {
                eprintln!("nothing was applied");
                return Ok(ExitCode::FAILURE);
            }
            let items: Vec<Value> = decoded
                .objects
                .iter()
                .map(|l| serde_json::to_value(&l.object))
                .collect::<Result<_, _>>()?;
            let what = format!(
                "applying {} object{}",
                items.len(),
                if items.len() == 1 { "" } else { "s" }
            );
            let result = Client::config_api(&connection)?
                .post(
                    "/apis/vmesh.io/v1/apply",
                    &json!({"items": items, "namespace": namespace}),
                    &what,
                )
                .await?;
            for item in result["items"].as_array().into_iter().flatten() {
                println!(
                    "{} {}",
                    object_name(&item["object"]),
                    item["outcome"].as_str().unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output: format,
            selector,
            field_selector,
            connection,
        } => {
            let info = match vmesh_api::view_for(&kind) {
                Some(view) => view,
                None => resolve_kind(&kind)?,
            };
            let namespace = (!all_namespaces).then_some(namespace.as_str());
            let client = Client::config_api(&connection)?;
            let objects = match &name {
                Some(name) => {
                    let namespace = namespace.or(Some("default"));
                    let what = format!("reading {}", describe(info, namespace, name));
                    vec![client.get(&info.path(namespace, Some(name)), &what).await?]
                }
                None => client
                    .get(
                        &with_selectors(
                            info.path(namespace, None),
                            selector.as_deref(),
                            field_selector.as_deref(),
                        ),
                        &format!("listing {}", info.plural),
                    )
                    .await?["items"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            };
            if objects.is_empty() {
                match namespace.filter(|_| info.namespaced) {
                    Some(ns) => eprintln!("No resources found in {ns} namespace."),
                    None => eprintln!("No resources found"),
                }
                return Ok(ExitCode::SUCCESS);
            }
            output::print(info, &objects, format, all_namespaces, name.is_some())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete {
            files,
            kind,
            name,
            namespace,
            connection,
        } => {
            let client = Client::config_api(&connection)?;
            let targets: Vec<(&KindInfo, Option<String>, String)> = if files.is_empty() {
                let (Some(kind), Some(name)) = (kind, name) else {
                    bail!("give -f FILE or KIND NAME")
                };
                vec![(resolve_kind(&kind)?, Some(namespace), name)]
            } else {
                let decoded = decode(&files, &namespace)?;
                if decoded.has_errors() {
                    eprintln!("nothing was deleted");
                    return Ok(ExitCode::FAILURE);
                }
                // Namespaces last: deleting one deletes what is in it.
                let mut objects: Vec<_> = decoded.objects.into_iter().map(|l| l.object).collect();
                objects.sort_by_key(|o| o.kind == "Namespace");
                objects
                    .into_iter()
                    .filter_map(|o| {
                        Some((
                            o.info()?,
                            o.metadata.namespace.clone(),
                            o.metadata.name().to_string(),
                        ))
                    })
                    .collect()
            };
            let mut failed = false;
            for (info, ns, name) in targets {
                let what = format!("deleting {}", describe(info, ns.as_deref(), &name));
                match client
                    .delete(&info.path(ns.as_deref(), Some(&name)), &what)
                    .await
                {
                    Ok(_) => println!("{}/{name} deleted", info.qualified_name()),
                    Err(e) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::ProxyStatus {
            connection,
            monitoring,
        } => {
            let proxies =
                crate::doctor::proxy_statuses_of(&connection, monitoring.as_deref()).await?;
            print!("{}", output::proxy_status_table(&proxies));
            Ok(ExitCode::SUCCESS)
        }
        Command::ProxyConfig { what } => crate::proxy_config::run(what).await,
        Command::Doctor {
            connection,
            monitoring,
        } => crate::doctor::run(&connection, monitoring.as_deref()).await,
        Command::Analyze(args) => crate::analyze::run(args).await,
        Command::Demo { keep, down } => crate::demo::run(keep, down).await,
        Command::Agent(args) => crate::agent::run(*args).await,
        Command::Workload(args)
        | Command::Experimental {
            what: crate::ExperimentalCommand::Workload(args),
        } => crate::onboarding::run(args).await,
        Command::Load(args) => crate::load::run(args).await,
        Command::DemoApp {
            addr,
            name,
            version,
            unhealthy_file,
        } => {
            crate::demo_app::run(addr, name, version, unhealthy_file).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Create { what } => {
            let (info, namespace, name, connection) = match what {
                CreateCommand::Namespace { name, connection } => {
                    (&vmesh_api::kinds::namespace::KIND, None, name, connection)
                }
                CreateCommand::Serviceaccount {
                    name,
                    namespace,
                    connection,
                } => (
                    &vmesh_api::kinds::service_account::KIND,
                    Some(namespace),
                    name,
                    connection,
                ),
            };
            let object = json!({
                "apiVersion": info.preferred_api_version(),
                "kind": info.kind,
                "metadata": {"name": name, "namespace": namespace},
            });
            let what = format!("creating {}", describe(info, namespace.as_deref(), &name));
            Client::config_api(&connection)?
                .post(&info.path(namespace.as_deref(), None), &object, &what)
                .await?;
            println!("{}/{name} created", info.qualified_name());
            Ok(ExitCode::SUCCESS)
        }
        Command::Label {
            args,
            namespace,
            overwrite,
            connection,
        } => label(&args, &namespace, overwrite, &connection).await,
        Command::Backup { output, connection } => {
            let client = Client::config_api(&connection)?;
            let snapshot = client
                .get(
                    "/apis/vmesh.io/v1/snapshot",
                    "taking a snapshot of the store",
                )
                .await?;
            let text = match snapshot {
                Value::String(text) => text,
                other => other.to_string(),
            };
            vmesh_ca::files::write_file(&output, text.as_bytes(), 0o600)
                .with_context(|| format!("writing {}", output.display()))?;
            let objects = text
                .lines()
                .filter(|l| l.starts_with("{\"object\""))
                .count();
            println!(
                "{objects} objects and the server's records written to {}",
                output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            from,
            data_dir,
            store,
        } => {
            let location = store.location(&data_dir)?;
            let file = std::fs::File::open(&from)
                .with_context(|| format!("opening {}", from.display()))?;
            let revision =
                vmesh_store::snapshot::restore(&location, &mut std::io::BufReader::new(file))
                    .with_context(|| format!("restoring {}", from.display()))?;
            println!("restored {} (revision {revision})", from.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Kubeconfig {
            name,
            namespace,
            connection,
        } => {
            let (server, ca) = crate::kubeconfig::endpoint(&connection).await?;
            print!(
                "{}",
                crate::kubeconfig::render(
                    &server,
                    connection.token.as_deref(),
                    ca.as_deref(),
                    &name,
                    &namespace
                )?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            what:
                TokenCommand::Create {
                    namespace,
                    service_account,
                    duration,
                    connection,
                },
        } => {
            let issued = Client::config_api(&connection)?
                .post(
                    &format!("/apis/vmesh.io/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"),
                    &json!({"durationSeconds": duration.as_secs()}),
                    &format!("issuing a token for ServiceAccount {namespace}/{service_account}"),
                )
                .await?;
            let token = issued["token"]
                .as_str()
                .context("the server's answer carries no token")?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            what:
                TokenCommand::Revoke {
                    namespace,
                    service_account,
                    id,
                    connection,
                },
        } => {
            let answer = Client::config_api(&connection)?
                .post(
                    &format!("/apis/vmesh.io/v1/namespaces/{namespace}/serviceaccounts/{service_account}/revoke"),
                    &json!({"id": id}),
                    &format!("revoking tokens of ServiceAccount {namespace}/{service_account}"),
                )
                .await?;
            println!("revoked {}", answer["revoked"].as_str().unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `vmesh label`: reads the object, changes its labels, writes it back
/// with the resourceVersion it was read at.
async fn label(
    args: &[String],
    namespace: &str,
    overwrite: bool,
    connection: &crate::Connection,
) -> Result<ExitCode> {
    let (kind, name, rest) = match args[0].split_once('/') {
        Some((kind, name)) => (kind, name, &args[1..]),
        None => (args[0].as_str(), args[1].as_str(), &args[2..]),
    };
    let changes = crate::label::Changes::parse(rest)?;
    let info = resolve_kind(kind)?;
    let namespace = info.namespaced.then_some(namespace);
    let path = info.path(namespace, Some(name));
    let client = Client::config_api(connection)?;
    let described = describe(info, namespace, name);
    let mut object = client.get(&path, &format!("reading {described}")).await?;
    let mut labels = crate::label::labels_of(&object);
    let (changed, missing) = changes.apply(&mut labels, overwrite)?;
    for key in missing {
        eprintln!("label {key:?} not found.");
    }
    let shown = format!("{}/{name}", info.qualified_name());
    if !changed {
        println!("{shown} not labeled");
        return Ok(ExitCode::SUCCESS);
    }
    crate::label::set_labels(&mut object, labels);
    client
        .put(&path, &object, &format!("labeling {described}"))
        .await?;
    println!("{shown} labeled");
    Ok(ExitCode::SUCCESS)
}

/// Prints where the server listens. Whoever started it may stop reading
/// after the line it needs: a closed stdout must not stop the server.
fn announce(running: &vmesh_server::Running) {
    use std::io::Write;
    let scheme = if running.api_tls { "https" } else { "http" };
    let mut lines = vec![format!("config API on {scheme}://{}", running.api_addr)];
    lines.extend(
        running
            .xds_plaintext_addr
            .map(|addr| format!("plaintext xDS on {addr}")),
    );
    lines.extend(
        running
            .monitoring_addr
            .map(|addr| format!("monitoring on http://{addr}")),
    );
    lines.extend(
        running
            .xds_addr
            .map(|addr| format!("xDS and CA over TLS on {addr}")),
    );
    let mut stdout = std::io::stdout().lock();
    for line in lines {
        if writeln!(stdout, "vmesh server: {line}").is_err() {
            return;
        }
    }
    let _ = stdout.flush();
}

/// `path` with `labelSelector` and `fieldSelector` in its query, encoded.
fn with_selectors(path: String, labels: Option<&str>, fields: Option<&str>) -> String {
    let mut query = reqwest::Url::parse("http://query/").expect("a fixed URL parses");
    {
        let mut pairs = query.query_pairs_mut();
        for (name, value) in [("labelSelector", labels), ("fieldSelector", fields)] {
            if let Some(value) = value {
                pairs.append_pair(name, value);
            }
        }
    }
    match query.query() {
        Some(query) if !query.is_empty() => format!("{path}?{query}"),
        _ => path,
    }
}

fn identity_config(ca: CaArgs) -> vmesh_server::identity::IdentityConfig {
    vmesh_server::identity::IdentityConfig {
        trust_domain: ca.trust_domain,
        plugged: ca
            .ca_cert
            .zip(ca.ca_key)
            .map(|(cert, key)| vmesh_server::identity::PluggedCa {
                cert,
                key,
                chain: ca.ca_chain,
            }),
        options: vmesh_ca::AuthorityOptions {
            default_workload_ttl: ca.workload_cert_ttl,
            max_workload_ttl: ca.max_workload_cert_ttl,
            serving_ttl: ca.serving_cert_ttl,
            ..Default::default()
        },
        extra_sans: ca.xds_sans,
        accept_new_root: ca.accept_new_root,
    }
}

/// Decodes every source, printing each problem on its own line.
fn decode(files: &[String], namespace: &str) -> Result<Decoded> {
    let sources = manifests::read_sources(files)?;
    let decoded = decode_sources(
        sources.iter().map(|(n, t)| (n.as_str(), t.as_str())),
        namespace,
    );
    for problem in &decoded.problems {
        println!("{problem}");
    }
    Ok(decoded)
}

fn resolve_kind(name: &str) -> Result<&'static KindInfo> {
    kind_for(name).with_context(|| {
        let known: Vec<String> = vmesh_api::kinds()
            .iter()
            .map(|k| match k.short_names.first() {
                Some(short) => format!("{} ({short})", k.plural),
                None => k.plural.to_string(),
            })
            .collect();
        format!("unknown kind {name:?}; known kinds: {}", known.join(", "))
    })
}

/// `Kind namespace/name` (`Kind name` when cluster-scoped), for messages.
fn describe(info: &KindInfo, namespace: Option<&str>, name: &str) -> String {
    match namespace.filter(|_| info.namespaced) {
        Some(ns) => format!("{} {ns}/{name}", info.kind),
        None => format!("{} {name}", info.kind),
    }
}

/// `workloadentry.networking.istio.io/name` for an object as the server returned it.
fn object_name(object: &Value) -> String {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let kind = vmesh_api::find_kind(
        object["apiVersion"].as_str().unwrap_or_default(),
        object["kind"].as_str().unwrap_or_default(),
    );
    match kind {
        Some(info) => format!("{}/{name}", info.qualified_name()),
        None => format!(
            "{}/{name}",
            object["kind"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_lowercase()
        ),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn stop_signal() {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate() => {}
    }
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
