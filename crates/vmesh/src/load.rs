//! `vmesh load`: sends HTTP requests and reports, as JSON, the status codes,
//! which workload answered (the demo application's `name=`) and latency
//! percentiles. Benchmarks and the demo run it inside network namespaces,
//! where a measuring process has to live.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use tokio::time::Instant;

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 100)]
    requests: usize,
    /// Requests in flight at once, each worker on its own kept-alive connection.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value = "GET")]
    method: String,
    /// `Name: value`; repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Keep sending for this long instead of a number of requests.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

/// One request's outcome: status (0 when it failed), who answered, how long it took.
type Sample = (u16, Option<String>, Duration);

pub async fn run(args: LoadArgs) -> Result<ExitCode> {
    let method: reqwest::Method = args.method.parse().context("--method")?;
    let mut headers = reqwest::header::HeaderMap::new();
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("--header {header:?} is not `Name: value`"))?;
        headers.insert(
            reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())?,
            value.trim().parse()?,
        );
    }
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(10))
        .build()?;
    let workers = args.concurrency.max(1);
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + d);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let count = args.requests / workers + usize::from(worker < args.requests % workers);
        let (client, method, url) = (client.clone(), method.clone(), args.url.clone());
        tasks.spawn(async move {
            let mut samples: Vec<Sample> = Vec::with_capacity(count);
            let more = |sent: usize| match deadline {
                Some(deadline) => Instant::now() < deadline,
                None => sent < count,
            };
            while more(samples.len()) {
                let started = Instant::now();
                let outcome = match client.request(method.clone(), &url).send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let body = response.text().await.unwrap_or_default();
                        let name = body
                            .split_whitespace()
                            .find_map(|w| w.strip_prefix("name="))
                            .map(str::to_string);
                        (status, name)
                    }
                    Err(_) => (0, None),
                };
                samples.push((outcome.0, outcome.1, started.elapsed()));
            }
            samples
        });
    }
    let mut samples = Vec::with_capacity(args.requests);
    while let Some(done) = tasks.join_next().await {
        samples.extend(done?);
    }
    println!("{}", summary(&samples, started.elapsed()));
    Ok(ExitCode::SUCCESS)
}

fn summary(samples: &[Sample], elapsed: Duration) -> serde_json::Value {
    let mut codes: BTreeMap<u16, usize> = BTreeMap::new();
    let mut answered_by: BTreeMap<&str, usize> = BTreeMap::new();
    for (status, name, _) in samples {
        *codes.entry(*status).or_default() += 1;
        if let Some(name) = name {
            *answered_by.entry(name).or_default() += 1;
        }
    }
    let mut latencies: Vec<Duration> = samples.iter().map(|s| s.2).collect();
    latencies.sort();
    let micros = |p: f64| {
        let index =
            ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len().max(1)) - 1;
        latencies.get(index).map_or(0, |d| d.as_micros())
    };
    let mean = latencies.iter().sum::<Duration>().as_micros() / latencies.len().max(1) as u128;
    json!({
        "requests": samples.len(),
        "codes": codes,
        "answered_by": answered_by,
        "latency_us": {"mean": mean, "p50": micros(0.5), "p90": micros(0.9), "p99": micros(0.99)},
        "seconds": elapsed.as_secs_f64(),
        "per_second": samples.len() as f64 / elapsed.as_secs_f64().max(f64::EPSILON),
    })
}
