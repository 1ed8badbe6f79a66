//! `vmesh bench xds`: the xDS load harness. It starts a control plane
//! (`vmesh server`, and with `--istiod` Istio's as well, on the same
//! objects), connects N simulated proxies on delta and state-of-the-world
//! ADS, many streams to an HTTP/2 connection, and makes a stream of changes
//! of every kind ([`mesh::ChangeKind`]). For each kind it reports the time
//! from the write to each proxy's ACK of a response carrying it (p50, p99,
//! max), and for the run the responses per second, the server's CPU
//! seconds and peak resident memory, and the harness's own CPU.
//!
//! The simulated proxies live in [`proxy`], the mesh and its changes in
//! [`mesh`], the control planes in [`target`].

mod mesh;
mod proxy;
mod target;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vmesh_testkit::process::cpu_seconds;

use anyhow::{Context, Result, bail};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use mesh::ChangeKind;
use proxy::{Decoded, Identity, Report};
use target::Target;

#[derive(Debug, clap::Args)]
pub struct XdsBench {
    /// Simulated proxies.
    #[arg(long, default_value_t = 1000)]
    proxies: usize,
    /// Services (ServiceEntries) in the mesh.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// WorkloadEntries behind each service.
    #[arg(long, default_value_t = 3)]
    endpoints: usize,
    /// Which share of the proxies speaks delta ADS; the others state of the world.
    #[arg(long, default_value_t = 0.5)]
    delta_share: f64,
    /// ADS streams sharing one HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    streams_per_connection: usize,
    /// Changes of each kind.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The kinds of change, in order (a deletion removes the service its round added).
    #[arg(long, value_delimiter = ',', default_values_t = ChangeKind::ALL)]
    kinds: Vec<ChangeKind>,
    /// Also run Istio's pilot-discovery on the same objects and changes, and
    /// print both with their ratio: the path of the repository's
    /// scripts/istiod-peer.sh, which builds it and runs it without Kubernetes.
    #[arg(long, value_name = "ISTIOD_PEER_SCRIPT", conflicts_with = "etcd")]
    istiod: Option<PathBuf>,
    /// Also run vmesh with its store in a three-member etcd on loopback
    /// (Debian's etcd-server), the same objects and changes, and print it
    /// beside the embedded store with the ratio.
    #[arg(long)]
    etcd: bool,
    /// How long a change may take to reach every proxy before it counts as lost.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    change_timeout: Duration,
    /// After the rounds: this long at `--rate` changes a second (kinds in
    /// turn) without waiting for each, then check every proxy's
    /// configuration against a fresh twin's and the memory's trend.
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// Changes a second during `--soak`.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Print the results as JSON too.
    #[arg(long)]
    json: bool,
}

impl std::fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The latencies of one change kind, sorted.
#[derive(Debug, Default, serde::Serialize)]
struct KindResult {
    samples: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Proxies that had not ACKed a change when it timed out.
    lost: usize,
}

#[derive(Debug, serde::Serialize)]
struct RunResult {
    control_plane: &'static str,
    proxies: usize,
    /// The initial objects written through the config API, per second.
    applied_per_second: f64,
    connect_ms: f64,
    kinds: Vec<(String, KindResult)>,
    responses_per_second: f64,
    server_cpu_seconds: f64,
    server_rss_mb_before_proxies: f64,
    server_rss_mb_synced: f64,
    server_peak_rss_mb: f64,
    server_rss_mb_settled: f64,
    harness_cpu_seconds: f64,
    soak: Option<SoakResult>,
}

pub async fn run(args: XdsBench) -> Result<()> {
    if args.kinds.contains(&ChangeKind::ServiceDelete)
        && !args.kinds.contains(&ChangeKind::ServiceAdd)
    {
        bail!("service-delete removes what service-add added: give both");
    }
    if args.proxies == 0 || args.services == 0 || args.streams_per_connection == 0 {
        bail!("--proxies, --services and --streams-per-connection must be positive");
    }
    let objects = mesh::objects(args.services, args.endpoints);
    println!(
        "mesh: {} services × {} endpoints; {} proxies ({:.0}% delta ADS), {} streams per HTTP/2 connection; {} rounds of {}",
        args.services,
        args.endpoints,
        args.proxies,
        args.delta_share * 100.0,
        args.streams_per_connection,
        args.rounds,
        args.kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut results = Vec::new();
    let dir = tempfile::tempdir()?;
    results.push(measure_vmesh(&args, dir.path(), &objects, None).await?);
    if args.etcd {
        let dir = tempfile::tempdir()?;
        let etcd = vmesh_testkit::etcd::EtcdCluster::start(3, &dir.path().join("etcd"))?;
        results.push(measure_vmesh(&args, dir.path(), &objects, Some(&etcd.url("bench"))).await?);
    }
    if let Some(peer) = &args.istiod {
        let dir = tempfile::tempdir()?;
        let started = Instant::now();
        let target = Target::istiod(peer, dir.path(), &objects).await?;
        let applied = objects.len() as f64 / started.elapsed().as_secs_f64();
        results.push(measure(&args, &target, applied).await?);
    }
    print_table(&results);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}

/// Starts `vmesh server` (on `store`, or the embedded one), writes the
/// objects through its API, and measures it.
async fn measure_vmesh(
    args: &XdsBench,
    dir: &std::path::Path,
    objects: &[serde_json::Value],
    store: Option<&str>,
) -> Result<RunResult> {
    let started = Instant::now();
    let target = Target::vmesh(dir, objects, store).await?;
    let took = started.elapsed().as_secs_f64();
    println!(
        "{}: {} objects applied in {:.0} ms ({:.0}/s)",
        target.name(),
        objects.len(),
        took * 1e3,
        objects.len() as f64 / took
    );
    measure(args, &target, objects.len() as f64 / took).await
}

async fn measure(args: &XdsBench, target: &Target, applied_per_second: f64) -> Result<RunResult> {
    // Let the control plane settle on the initial objects first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = target.pid();
    let rss_before = memory_mb(pid, "VmRSS")?;
    let connect = Instant::now();
    let mut fleet = Fleet::connect(args, target).await?;
    fleet.spawn(false);
    fleet.wait_ready(args.proxies).await?;
    let connect_ms = connect.elapsed().as_secs_f64() * 1e3;
    println!(
        "{}: {} proxies connected and configured in {connect_ms:.0} ms ({} streams opened again)",
        target.name(),
        args.proxies,
        fleet.reconnects
    );
    let rss_synced = memory_mb(pid, "VmRSS")?;

    let cpu_before = (cpu_seconds(&pid.to_string())?, cpu_seconds("self")?);
    let changes_started = Instant::now();
    let mut responses = 0u64;
    let mut latencies: Vec<(ChangeKind, Vec<Duration>, usize)> = args
        .kinds
        .iter()
        .map(|kind| (*kind, Vec::new(), 0))
        .collect();
    let mut change_id = 0u64;
    for round in 0..args.rounds {
        for (kind, samples, lost) in latencies.iter_mut() {
            let change = mesh::change(*kind, round, args.services);
            change_id += 1;
            fleet
                .awaited
                .send_replace(Some((change_id, Arc::new(change.expect.clone()))));
            // The previous change's debounce window closes first.
            tokio::time::sleep(Duration::from_millis(250)).await;
            let start = Instant::now();
            if !change.write.is_empty() {
                target.write(&change.write).await?;
            }
            if !change.delete.is_empty() {
                target.delete(&change.delete).await?;
            }
            let deadline = start + args.change_timeout;
            let mut seen = 0;
            while seen < args.proxies {
                match tokio::time::timeout_at(deadline, fleet.next()).await {
                    Ok(Some(Report::Saw { change, at })) if change == change_id => {
                        seen += 1;
                        samples.push(at.duration_since(start));
                    }
                    Ok(Some(Report::Response)) => responses += 1,
                    Ok(Some(Report::Failed(e))) => bail!("{}: {e}", target.name()),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            *lost += args.proxies - seen;
        }
    }
    // Responses still queued count too.
    while let Some(report) = fleet.try_next() {
        if matches!(report, Report::Response) {
            responses += 1;
        }
    }
    let elapsed = changes_started.elapsed().as_secs_f64();
    let cpu_after = (cpu_seconds(&pid.to_string())?, cpu_seconds("self")?);
    let peak = memory_mb(pid, "VmHWM")?;
    // What stays once the bursts are over and the allocator has given back
    // what they freed (jemalloc's decay is 10 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let settled = memory_mb(pid, "VmRSS")?;
    let soak = match args.soak {
        Some(duration) => Some(soak(args, target, &mut fleet, duration).await?),
        None => None,
    };
    fleet.proxies.abort_all();
    Ok(RunResult {
        control_plane: target.name(),
        proxies: args.proxies,
        applied_per_second,
        connect_ms,
        kinds: latencies
            .into_iter()
            .map(|(kind, mut samples, lost)| {
                (kind.name().to_string(), summarize(&mut samples, lost))
            })
            .collect(),
        responses_per_second: responses as f64 / elapsed,
        server_cpu_seconds: cpu_after.0 - cpu_before.0,
        server_rss_mb_before_proxies: rss_before,
        server_rss_mb_synced: rss_synced,
        server_peak_rss_mb: peak,
        server_rss_mb_settled: settled,
        harness_cpu_seconds: cpu_after.1 - cpu_before.1,
        soak,
    })
}

/// The simulated proxies of one run and what they report.
struct Fleet<'a> {
    args: &'a XdsBench,
    istio_version: String,
    channels: Vec<tonic::transport::Channel>,
    decoded: Arc<Decoded>,
    awaited: watch::Sender<proxy::Awaited>,
    /// Bumped to ask every tracked proxy what it holds.
    asks: watch::Sender<u64>,
    reports_tx: mpsc::UnboundedSender<Report>,
    reports: mpsc::UnboundedReceiver<Report>,
    proxies: tokio::task::JoinSet<()>,
    /// Streams that failed and were opened again.
    reconnects: usize,
}

impl Fleet<'_> {
    /// The next report; streams opened again are counted on the way.
    async fn next(&mut self) -> Option<Report> {
        loop {
            match self.reports.recv().await? {
                Report::Reconnected => self.reconnects += 1,
                report => return Some(report),
            }
        }
    }

    /// The next report already there, if any (counting reconnections).
    fn try_next(&mut self) -> Option<Report> {
        loop {
            match self.reports.try_recv().ok()? {
                Report::Reconnected => self.reconnects += 1,
                report => return Some(report),
            }
        }
    }
}

impl<'a> Fleet<'a> {
    /// Opens the HTTP/2 connections the proxies share.
    async fn connect(args: &'a XdsBench, target: &Target) -> Result<Fleet<'a>> {
        let connections = args.proxies.div_ceil(args.streams_per_connection);
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            // Envoy's own windows (256 MiB a stream), and a connection window
            // as large as HTTP/2 allows: the streams sharing a connection must
            // not wait for one another's reads, as Envoys on connections of
            // their own do not.
            let channel = tonic::transport::Endpoint::from_shared(target.xds_url())?
                .initial_connection_window_size(i32::MAX as u32)
                .initial_stream_window_size(256 << 20)
                .connect()
                .await
                .with_context(|| format!("connecting to {}", target.xds_url()))?;
            channels.push(channel);
        }
        let (reports_tx, reports) = mpsc::unbounded_channel();
        Ok(Fleet {
            args,
            istio_version: target.istio_version(),
            channels,
            decoded: Arc::default(),
            awaited: watch::channel(None).0,
            asks: watch::channel(0).0,
            reports_tx,
            reports,
            proxies: tokio::task::JoinSet::new(),
            reconnects: 0,
        })
    }

    /// Starts `--proxies` proxies; `fresh`: the from-scratch twins of a soak.
    fn spawn(&mut self, fresh: bool) {
        let args = self.args;
        let delta_every = if args.delta_share <= 0.0 {
            usize::MAX
        } else {
            (1.0 / args.delta_share).round().max(1.0) as usize
        };
        for index in 0..args.proxies {
            let identity = Identity {
                index,
                delta: index % delta_every == 0,
                istio_version: self.istio_version.clone(),
                track: args.soak.is_some().then(|| (self.asks.subscribe(), fresh)),
            };
            self.proxies.spawn(proxy::run(
                identity,
                self.channels[index / args.streams_per_connection].clone(),
                self.decoded.clone(),
                self.awaited.subscribe(),
                self.reports_tx.clone(),
            ));
        }
    }

    /// Waits for `count` proxies to have their whole configuration.
    async fn wait_ready(&mut self, count: usize) -> Result<()> {
        let mut ready = 0;
        while ready < count {
            match tokio::time::timeout(Duration::from_secs(300), self.next()).await {
                Ok(Some(Report::Ready)) => ready += 1,
                Ok(Some(Report::Failed(e))) => bail!("{e}"),
                Ok(Some(_)) => {}
                _ => bail!("only {ready} of {count} proxies got their configuration"),
            }
        }
        Ok(())
    }
}

/// What a soak found.
#[derive(Debug, serde::Serialize)]
struct SoakResult {
    seconds: f64,
    changes: usize,
    /// Mean resident memory over the first and the last minute (a tenth of
    /// the soak when it is shorter than ten minutes).
    rss_mb_first: f64,
    rss_mb_last: f64,
    /// Proxies whose configuration differs from that of a fresh twin
    /// connected after the last change: pushes lost or wrong.
    diverged: usize,
}

/// `--rate` changes a second for `duration`, without waiting for them;
/// then every proxy must hold what a fresh twin of it gets from scratch.
async fn soak(
    args: &XdsBench,
    target: &Target,
    fleet: &mut Fleet<'_>,
    duration: Duration,
) -> Result<SoakResult> {
    let pid = target.pid();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    let started = Instant::now();
    let mut rss = Vec::new();
    let mut changes = 0;
    while started.elapsed() < duration {
        ticker.tick().await;
        let kind = args.kinds[changes % args.kinds.len()];
        // Rounds after the measured ones: new markers, new services.
        let round = args.rounds + changes / args.kinds.len();
        let change = mesh::change(kind, round, args.services);
        if !change.write.is_empty() {
            target.write(&change.write).await?;
        }
        if !change.delete.is_empty() {
            target.delete(&change.delete).await?;
        }
        changes += 1;
        if rss.len() < started.elapsed().as_secs() as usize {
            rss.push(memory_mb(pid, "VmRSS")?);
        }
        while let Some(report) = fleet.try_next() {
            if let Report::Failed(e) = report {
                bail!("{}: {e}", target.name());
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}: {changes} changes in {seconds:.0} s; checking every proxy against a fresh twin",
        target.name()
    );
    // The last pushes land; then the twins connect and get the final state.
    tokio::time::sleep(Duration::from_secs(5)).await;
    fleet.spawn(true);
    fleet.wait_ready(args.proxies).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.asks.send_modify(|ask| *ask += 1);
    let mut held: HashMap<(usize, bool), u64> = HashMap::new();
    while held.len() < 2 * args.proxies {
        match tokio::time::timeout(Duration::from_secs(60), fleet.next()).await {
            Ok(Some(Report::Holds {
                index,
                fresh,
                fingerprint,
            })) => {
                held.insert((index, fresh), fingerprint);
            }
            Ok(Some(Report::Failed(e))) => bail!("{}: {e}", target.name()),
            Ok(Some(_)) => {}
            _ => bail!(
                "only {} of {} proxies said what they hold",
                held.len(),
                2 * args.proxies
            ),
        }
    }
    let diverged = (0..args.proxies)
        .filter(|index| held.get(&(*index, false)) != held.get(&(*index, true)))
        .count();
    let window = (rss.len() / 10).clamp(1, 60);
    let mean = |samples: &[f64]| samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    Ok(SoakResult {
        seconds,
        changes,
        rss_mb_first: mean(&rss[..window.min(rss.len())]),
        rss_mb_last: mean(&rss[rss.len().saturating_sub(window)..]),
        diverged,
    })
}

fn summarize(samples: &mut [Duration], lost: usize) -> KindResult {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let percentile = |p: f64| {
        let index = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        ms(samples[index])
    };
    if samples.is_empty() {
        return KindResult {
            lost,
            ..Default::default()
        };
    }
    KindResult {
        samples: samples.len(),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        max_ms: samples.last().map(|d| ms(*d)).unwrap_or_default(),
        lost,
    }
}

fn print_table(results: &[RunResult]) {
    let vmesh = &results[0];
    let peer = results.get(1);
    println!();
    print!(
        "{:<16} {:>8} {:>9} {:>9} {:>9} {:>5}",
        format!("change ({})", vmesh.control_plane),
        "samples",
        "p50 ms",
        "p99 ms",
        "max ms",
        "lost"
    );
    if let Some(peer) = peer {
        print!(
            "   {:>15} {:>9} {:>5}  {:>9}",
            format!("{} p50", peer.control_plane),
            "p99 ms",
            "lost",
            "p99 ratio"
        );
    }
    println!();
    for (index, (kind, result)) in vmesh.kinds.iter().enumerate() {
        print!(
            "{kind:<16} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>5}",
            result.samples, result.p50_ms, result.p99_ms, result.max_ms, result.lost
        );
        if let Some((_, other)) = peer.and_then(|p| p.kinds.get(index)) {
            print!(
                "   {:>15.1} {:>9.1} {:>5}  {:>9.3}",
                other.p50_ms,
                other.p99_ms,
                other.lost,
                result.p99_ms / other.p99_ms.max(f64::MIN_POSITIVE)
            );
        }
        println!();
    }
    let row = |name: &str, value: &dyn Fn(&RunResult) -> f64, unit: &str| {
        print!("{name:<34} {:>10.1} {unit}", value(vmesh));
        if let Some(peer) = peer {
            let theirs = value(peer);
            print!(
                "   {} {theirs:>10.1} {unit}   ratio {:.3}",
                peer.control_plane,
                value(vmesh) / theirs.max(f64::MIN_POSITIVE)
            );
        }
        println!();
    };
    println!();
    row(
        "objects applied per second",
        &|r| r.applied_per_second,
        "/s",
    );
    row("proxies connected and configured", &|r| r.connect_ms, "ms");
    row(
        "responses per second (changes)",
        &|r| r.responses_per_second,
        "/s",
    );
    row(
        "server CPU during the changes",
        &|r| r.server_cpu_seconds,
        "s",
    );
    row(
        "server resident before proxies",
        &|r| r.server_rss_mb_before_proxies,
        "MB",
    );
    row(
        "server resident, proxies synced",
        &|r| r.server_rss_mb_synced,
        "MB",
    );
    row("server peak resident", &|r| r.server_peak_rss_mb, "MB");
    row(
        "server resident 12 s after",
        &|r| r.server_rss_mb_settled,
        "MB",
    );
    row(
        "harness CPU during the changes",
        &|r| r.harness_cpu_seconds,
        "s",
    );
    for result in results {
        if let Some(soak) = &result.soak {
            println!(
                "{} soak: {} changes in {:.0} s; resident {:.0} MB at the start, {:.0} MB at the end ({:+.1} %); {} of {} proxies differ from a fresh twin",
                result.control_plane,
                soak.changes,
                soak.seconds,
                soak.rss_mb_first,
                soak.rss_mb_last,
                (soak.rss_mb_last / soak.rss_mb_first - 1.0) * 100.0,
                soak.diverged,
                result.proxies
            );
        }
    }
}

/// A kernel memory figure of process `pid` in MB (`VmRSS`, `VmHWM`).
fn memory_mb(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .split_whitespace()
                .next()
        })
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{field} of process {pid}"))?;
    Ok(kb / 1024.0)
}
